"""Integrity of an archive against its manifests: ``radiarc verify`` (docs/storage.md).

For each SOP instance the latest ``archived`` manifest row names an array; :func:`verify_archive`
checks a seeded random sample of them (or all) and returns a :class:`VerifyReport` with one
:class:`Problem` per failed check:

- the array exists (``missing``) and is marked complete (``incomplete``);
- its chunk objects, read once, hash (:func:`storage.chunks.chunks_sha256`) to the SHA-256
  recorded in its attributes at archive time (``corrupt``) and in the manifest row
  (``mismatch``: the array was rewritten since that row);
- ``archived_bytes`` of the row equals the bytes really stored;
- every chunk stream parses and passes its checksums (shard index CRC32C, stream header and
  per-tile CRC-32; ``corrupt``) and the whole image decodes from exactly the bytes hashed;
- shape, dtype and bits stored agree with the row's ``rows``, ``columns``, ``bits_stored``;
- the decoded pixels hash to the digest measured at archive time; a difference is a
  ``warning`` only, since the codec's float network may decode slightly differently on
  another machine (CPU/GPU) while the stored bytes are intact.

Arrays archived before checksums existed (manifest schema 1) get a ``warning`` that their
bytes could not be verified; everything else is still checked. With every instance checked
(``sample=None``, no run), complete arrays that no manifest row records as archived are
reported as ``orphan`` warnings. Problems name instances by SOP Instance UID and array path
(UIDs, not patient values); nothing here reads or prints a patient value.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.chunks import (
    CHUNKS_DIGEST,
    array_from_objects,
    check_objects,
    chunk_objects,
    chunks_sha256,
    pixels_sha256,
)
from storage.fsutil import StorageOptions, join
from storage.layout import Archive
from storage.manifest import MANIFEST_DIR, read_manifest
from storage.uids import UIDError, validate_uid

__all__ = [
    "DEFAULT_SAMPLE",
    "FAILURES",
    "Problem",
    "VerifyReport",
    "check_instance",
    "verify_archive",
]

DEFAULT_SAMPLE = 20
#: Statuses that make verification fail (exit status 1); ``warning`` and ``orphan`` do not.
FAILURES = ("missing", "incomplete", "corrupt", "mismatch", "error")
_ROW_COLUMNS = [
    "run_id",
    "timestamp",
    "status",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "rows",
    "columns",
    "bits_stored",
    "archived_bytes",
    "stored_sha256",
    "decoded_sha256",
]
_MAX_CHUNK_LINES = 5

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Problem:
    """One failed check of one instance (or one orphan array)."""

    status: str  # missing, incomplete, corrupt, mismatch, error, warning or orphan
    sop_instance_uid: str
    check: str  # array, complete, sha256, archived_bytes, chunk c/<row>/<col>, decode, ...
    detail: str
    path: str  # study/series/sop inside the archive


@dataclass
class VerifyReport:
    """What :func:`verify_archive` checked and found."""

    archive: str
    instances: int  # archived instances in scope (the latest archived row of each)
    checked: int
    sampled: bool
    seed: int | None
    run_id: str | None
    orphans_checked: bool
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    sample_uids: list[str] = field(default_factory=list)  # the instances of a sample

    @property
    def failed(self) -> bool:
        return any(problem.status in FAILURES for problem in self.problems)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def counts(self) -> dict[str, int]:
        """Checked instances by worst outcome (``ok`` when none), plus ``orphan`` arrays."""
        worst: dict[str, str] = {}
        order = {status: rank for rank, status in enumerate(("warning", *FAILURES))}
        orphans = 0
        for problem in self.problems:
            if problem.status == "orphan":
                orphans += 1
                continue
            previous = worst.get(problem.path)
            if previous is None or order[problem.status] > order[previous]:
                worst[problem.path] = problem.status
        counts = {"ok": self.checked - len(worst)}
        for status in ("warning", *FAILURES):
            counts[status] = sum(1 for value in worst.values() if value == status)
        counts["orphan"] = orphans
        return counts

    def summary(self) -> str:
        scope = f"run {self.run_id}" if self.run_id else "all runs"
        how = f"random sample, seed {self.seed}" if self.sampled else "all"
        counts = self.counts()
        found = ", ".join(
            f"{value} {name}" for name, value in counts.items() if value or name == "ok"
        )
        verdict = "FAILED" if self.failed else "OK"
        return (
            f"{verdict}: checked {self.checked} of {self.instances} archived instances "
            f"({how}; {scope}): {found} ({self.seconds:.1f} s)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "ok": not self.failed,
            "instances": self.instances,
            "checked": self.checked,
            "sampled": self.sampled,
            "seed": self.seed,
            "run_id": self.run_id,
            "orphans_checked": self.orphans_checked,
            "counts": self.counts(),
            "seconds": round(self.seconds, 3),
            "problems": [asdict(problem) for problem in self.problems],
            "sample_uids": self.sample_uids if self.sampled else None,
        }

    def problems_table(self) -> pa.Table:
        names = ["status", "sop_instance_uid", "check", "detail"]
        return pa.table(
            {name: [getattr(problem, name) for problem in self.problems] for name in names},
            schema=pa.schema([pa.field(name, pa.string()) for name in names]),
        )


def verify_archive(
    archive_uri: str,
    storage_options: StorageOptions | None = None,
    *,
    sample: int | None = DEFAULT_SAMPLE,
    seed: int | None = None,
    run_id: str | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check ``sample`` randomly chosen archived instances (all when None) of the archive.

    ``seed`` makes the sample reproducible (a random one is drawn, and reported, when None).
    ``run_id`` limits the check to instances whose latest archived row belongs to that run.
    Orphan arrays are looked for only when every instance of every run is checked.
    ``progress(done, total)`` is called after each instance. Raises ``FileNotFoundError``
    when there is no archive at ``archive_uri``.
    """
    if sample is not None and sample < 1:
        raise ValueError("sample must be at least 1")
    started = time.perf_counter()
    archive = Archive(archive_uri, storage_options, create=False)
    latest, failed_later = _latest_archived(archive)
    if run_id is not None:
        latest = {sop: row for sop, row in latest.items() if row["run_id"] == run_id}
    uids = sorted(latest)
    sampled = sample is not None and sample < len(uids)
    if sample is not None and seed is None:
        seed = random.SystemRandom().randrange(2**31)
    chosen = sorted(random.Random(seed).sample(uids, sample)) if sampled and sample else uids
    report = VerifyReport(
        archive=archive.uri,
        instances=len(uids),
        checked=len(chosen),
        sampled=sampled,
        seed=seed if sampled else None,
        run_id=run_id,
        orphans_checked=sample is None and run_id is None,
        sample_uids=chosen if sampled else [],
    )
    for done, sop in enumerate(chosen, 1):
        problems = check_instance(archive, latest[sop])
        if sop in failed_later and any(p.status == "incomplete" for p in problems):
            problems.append(
                Problem(
                    "warning",
                    sop,
                    "later attempt",
                    f"run {failed_later[sop]} failed to re-archive it after this row",
                    _row_path(latest[sop]),
                )
            )
        report.problems += problems
        if progress is not None:
            progress(done, len(chosen))
    if report.orphans_checked:
        report.problems += _orphans(archive, {_row_path(row) for row in latest.values()})
    report.seconds = time.perf_counter() - started
    return report


def _latest_archived(archive: Archive) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The latest ``archived`` row per SOP instance, and the instances whose latest attempt
    (archived or failed) is a later failure (-> the run of that failure)."""
    table = read_manifest(
        archive.uri,
        archive.storage_options,
        columns=_ROW_COLUMNS,
        filter=pc.field("status").isin(["archived", "failed"])
        & pc.field("sop_instance_uid").is_valid(),
    )
    latest: dict[str, dict[str, Any]] = {}
    last_status: dict[str, tuple[str, str]] = {}
    for row in table.sort_by([("timestamp", "ascending")]).to_pylist():
        sop = row["sop_instance_uid"]
        last_status[sop] = (row["status"], row["run_id"])
        if row["status"] == "archived" and row["study_instance_uid"] and row["series_instance_uid"]:
            latest[sop] = row
    failed_later = {
        sop: run
        for sop, (status, run) in last_status.items()
        if status == "failed" and sop in latest
    }
    return latest, failed_later


def _row_path(row: dict[str, Any]) -> str:
    return f"{row['study_instance_uid']}/{row['series_instance_uid']}/{row['sop_instance_uid']}"


def check_instance(archive: Archive, row: dict[str, Any]) -> list[Problem]:
    """Every check of one instance against its latest archived manifest row (a dict of the
    manifest's columns); an empty list when all pass."""
    sop = str(row["sop_instance_uid"])
    path = _row_path(row)
    problems: list[Problem] = []

    def report(status: str, check: str, detail: str) -> None:
        problems.append(Problem(status, sop, check, detail, path))

    try:
        for uid in path.split("/"):
            validate_uid(uid, "UID", lenient=True)
    except UIDError as error:
        report("error", "array", f"manifest row has an invalid UID ({error})")
        return problems
    array_path = join(archive.root, path)
    try:
        metadata_json = archive.fs.cat_file(join(array_path, "zarr.json"))
    except FileNotFoundError:
        report("missing", "array", "no array (zarr.json) where the manifest says it is archived")
        return problems
    except OSError as error:
        report("error", "array", f"cannot read zarr.json: {type(error).__name__}: {error}")
        return problems
    try:
        metadata = json.loads(metadata_json)
        radiarc = metadata["attributes"]["radiarc"]
        if metadata.get("node_type") != "array" or not isinstance(radiarc, dict):
            raise ValueError("not an array with radiarc attributes")
    except (ValueError, KeyError, TypeError) as error:
        report("corrupt", "array", f"unreadable array metadata (zarr.json): {error}")
        return problems
    if radiarc.get("complete") is not True:
        report("incomplete", "complete", "array not marked complete (interrupted or failed write)")
        return problems

    _check_metadata(metadata, radiarc, row, report)
    try:
        objects = chunk_objects(archive.fs, array_path, metadata)
    except (OSError, ValueError, KeyError, TypeError) as error:
        report("error", "chunks", f"cannot read chunk objects: {type(error).__name__}: {error}")
        return problems
    intact = _check_digest(objects, radiarc, row, report)
    stored_bytes = sum(len(data) for data in objects.values())
    if row["archived_bytes"] is not None and row["archived_bytes"] != stored_bytes:
        report(
            "corrupt" if intact is not True else "mismatch",
            "archived_bytes",
            f"manifest says {row['archived_bytes']} bytes, {stored_bytes} are stored",
        )

    broken = check_objects(objects, metadata)
    for key, reason in list(broken.items())[:_MAX_CHUNK_LINES]:
        report("corrupt", f"chunk {key}", reason)
    if len(broken) > _MAX_CHUNK_LINES:
        report("corrupt", "chunks", f"{len(broken) - _MAX_CHUNK_LINES} more corrupt chunks")
    if broken:
        return problems
    try:
        pixels = np.asarray(array_from_objects(metadata_json, objects)[...])
    except Exception as error:  # whatever the codec or zarr raise on bad bytes
        report("corrupt", "decode", f"{type(error).__name__}: {error}")
        return problems
    stored = _stored(radiarc)
    expected = stored.get("decoded_sha256") or row.get("decoded_sha256")
    if expected and intact is not False and pixels_sha256(pixels) != expected:
        report(
            "warning",
            "decoded_sha256",
            "decoded pixels differ from those measured at archive time (stored bytes intact; "
            "the codec's float network may decode differently on other hardware)",
        )
    return problems


def _check_metadata(
    metadata: dict[str, Any],
    radiarc: dict[str, Any],
    row: dict[str, Any],
    report: Callable[[str, str, str], None],
) -> None:
    shape = [int(side) for side in metadata.get("shape", [])]
    if row["rows"] is not None and shape != [row["rows"], row["columns"]]:
        report("mismatch", "shape", f"array is {shape}, manifest {row['rows']}x{row['columns']}")
    bits = row["bits_stored"]
    if bits is not None:
        dtype = "uint8" if bits <= 8 else "uint16"
        if metadata.get("data_type") != dtype:
            report(
                "mismatch",
                "dtype",
                f"array is {metadata.get('data_type')}, {bits} bits stored need {dtype}",
            )
        pixels = radiarc.get("pixels") or {}
        if pixels.get("bits_stored") != bits:
            report(
                "mismatch",
                "bits_stored",
                f"array says {pixels.get('bits_stored')}, manifest {bits}",
            )


def _check_digest(
    objects: dict[str, bytes],
    radiarc: dict[str, Any],
    row: dict[str, Any],
    report: Callable[[str, str, str], None],
) -> bool | None:
    """Compare the stored bytes' SHA-256 with the attribute's and the manifest's: True when
    they match what was recorded, False when not, None when nothing was recorded."""
    stored = _stored(radiarc)
    digest = chunks_sha256(objects)
    size = (len(objects), sum(len(data) for data in objects.values()))
    found = f"{size[0]} objects, {size[1]} bytes"
    if size == (stored.get("objects"), stored.get("bytes")):
        found = "same objects and sizes: bytes changed"
    elif "objects" in stored:
        found += f"; recorded {stored.get('objects')} objects, {stored.get('bytes')} bytes"
    recorded = stored.get("sha256") if stored.get("algorithm") == CHUNKS_DIGEST else None
    if stored.get("sha256") and recorded is None:
        report("error", "sha256", f"unknown checksum algorithm {stored.get('algorithm')!r}")
    manifest = row.get("stored_sha256")
    if recorded is None and manifest is None:
        report("warning", "sha256", "no checksum recorded (archived before checksums): unverified")
        return None
    if recorded is not None and digest != recorded:
        report(
            "corrupt",
            "sha256",
            f"chunks do not match the SHA-256 recorded at archive time ({found})",
        )
        return False
    if manifest is not None and digest != manifest:
        if recorded is None:
            report(
                "corrupt", "sha256", f"stored chunks do not match the manifest's SHA-256 ({found})"
            )
            return False
        report(
            "mismatch",
            "sha256",
            "array is intact but not the one the manifest row describes (re-archived since?)",
        )
    return True


def _stored(radiarc: dict[str, Any]) -> dict[str, Any]:
    """The ``radiarc.stored`` attribute (digests recorded at archive time); empty if none."""
    stored = radiarc.get("stored")
    return stored if isinstance(stored, dict) else {}


def _orphans(archive: Archive, recorded: set[str]) -> list[Problem]:
    """Complete instance arrays that no archived manifest row names."""
    problems = []
    for study in _uid_children(archive, archive.root):
        for series in _uid_children(archive, join(archive.root, study)):
            for sop in _uid_children(archive, join(archive.root, study, series)):
                path = f"{study}/{series}/{sop}"
                if path in recorded:
                    continue
                try:
                    metadata = json.loads(
                        archive.fs.cat_file(join(archive.root, path, "zarr.json"))
                    )
                    complete = metadata["attributes"]["radiarc"]["complete"] is True
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # not an instance array
                if complete:
                    problems.append(
                        Problem(
                            "orphan",
                            sop,
                            "manifest",
                            "complete array with no archived manifest row",
                            path,
                        )
                    )
    return problems


def _uid_children(archive: Archive, directory: str) -> list[str]:
    """Sub-directories of ``directory`` named like UIDs (not manifests/, reports/, ...)."""
    names = []
    try:
        entries = archive.fs.ls(directory, detail=True)
    except FileNotFoundError:
        return []
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or name == MANIFEST_DIR:
            continue
        try:
            names.append(validate_uid(name, "UID", lenient=True))
        except UIDError:
            continue
    return sorted(names)
