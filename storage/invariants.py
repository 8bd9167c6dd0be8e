"""What must hold of an archive whatever faults its runs met, and fingerprints to compare two
archives by: used by the reliability tests, ``python -m flows.chaos`` and ``python -m
flows.soak``.

Fingerprints leave out what differs between two correct runs (run ids, times, worker names,
seconds) and keep what must not: every stored chunk's bytes, every attribute that describes
the image, and each source's final manifest row.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from storage.fsutil import StorageOptions, open_fs
from storage.manifest import read_manifest

__all__ = [
    "Invariants",
    "archive_fingerprint",
    "archive_invariants",
    "complete_instances",
    "manifest_outcome",
]

#: Manifest columns that two correct runs of the same export may differ in.
VOLATILE_COLUMNS = {
    "run_id",
    "timestamp",
    "worker",
    "read_seconds",
    "encode_seconds",
    "verify_seconds",
    "total_seconds",
}


def manifest_outcome(
    archive_uri: str, storage_options: StorageOptions | None = None
) -> dict[str, dict[str, Any]]:
    """Per source checksum, its latest manifest row without the volatile columns."""
    table = read_manifest(archive_uri, storage_options)
    latest: dict[str, tuple[Any, dict[str, Any]]] = {}
    for row in table.to_pylist():
        key = row["source_checksum"] or row["source_uri"]
        if key not in latest or row["timestamp"] >= latest[key][0]:
            latest[key] = (row["timestamp"], row)
    return {
        key: {k: v for k, v in row.items() if k not in VOLATILE_COLUMNS}
        for key, (_, row) in latest.items()
    }


def _array_metadata(archive_uri: str, options: StorageOptions | None) -> Iterator[tuple[Any, str]]:
    """(filesystem, array folder) of every zarr array under the archive."""
    fs, root = open_fs(archive_uri, options)
    for path in sorted(fs.find(root)):
        is_node = path.endswith("/zarr.json") and path != f"{root}/zarr.json"
        if is_node and json.loads(fs.cat_file(path)).get("node_type") == "array":
            yield fs, path.rsplit("/", 1)[0]


def complete_instances(archive_uri: str, options: StorageOptions | None = None) -> set[str]:
    """``study/series/sop`` of every array marked complete (what the archive claims done)."""
    fs, root = open_fs(archive_uri, options)
    done = set()
    for _, folder in _array_metadata(archive_uri, options):
        node = json.loads(fs.cat_file(f"{folder}/zarr.json"))
        if node.get("attributes", {}).get("radiarc", {}).get("complete") is True:
            done.add(folder[len(root) + 1 :])
    return done


def archive_fingerprint(archive_uri: str, options: StorageOptions | None = None) -> dict[str, str]:
    """Per instance array: a SHA-256 of its stored chunk objects and of its attributes without
    the run's identity and time (``radiarc.archived``)."""
    _, root = open_fs(archive_uri, options)
    prints: dict[str, str] = {}
    for fs, folder in _array_metadata(archive_uri, options):
        node = json.loads(fs.cat_file(f"{folder}/zarr.json"))
        attributes: dict[str, Any] = dict(node.get("attributes") or {})
        radiarc = dict(attributes.get("radiarc") or {})
        radiarc.pop("archived", None)
        digest = hashlib.sha256()
        digest.update(json.dumps({**attributes, "radiarc": radiarc}, sort_keys=True).encode())
        for path in sorted(fs.find(folder)):
            if path != f"{folder}/zarr.json":
                digest.update(path[len(folder) :].encode())
                digest.update(fs.cat_file(path))
        prints[folder[len(root) + 1 :]] = digest.hexdigest()
    return prints


@dataclass(frozen=True)
class Invariants:
    """What must hold of an archive whatever faults its runs met."""

    rows: int
    one_row_per_source_per_run: bool
    archived_at_most_once: bool  # no instance has two ``archived`` rows
    complete_equals_archived: bool  # arrays marked complete == instances with archived rows
    failed_rows_have_reasons: bool
    latest: dict[str, str]  # source checksum -> status of its latest row

    @property
    def hold(self) -> bool:
        return (
            self.one_row_per_source_per_run
            and self.archived_at_most_once
            and self.complete_equals_archived
            and self.failed_rows_have_reasons
        )


def archive_invariants(archive_uri: str, options: StorageOptions | None = None) -> Invariants:
    """Check the archive at ``archive_uri`` against its manifests."""
    rows = read_manifest(archive_uri, options).to_pylist()
    per_run = Counter((row["run_id"], row["source_checksum"] or row["source_uri"]) for row in rows)
    archived_rows = [row for row in rows if row["status"] == "archived"]
    per_instance = Counter(row["sop_instance_uid"] for row in archived_rows)
    archived = {
        f"{r['study_instance_uid']}/{r['series_instance_uid']}/{r['sop_instance_uid']}"
        for r in archived_rows
    }
    latest: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r["timestamp"]):
        latest[row["source_checksum"] or row["source_uri"]] = row["status"]
    return Invariants(
        rows=len(rows),
        one_row_per_source_per_run=set(per_run.values()) <= {1},
        archived_at_most_once=set(per_instance.values()) <= {1},
        complete_equals_archived=complete_instances(archive_uri, options) == archived,
        failed_rows_have_reasons=all(r["reason"] for r in rows if r["status"] != "archived"),
        latest=latest,
    )
