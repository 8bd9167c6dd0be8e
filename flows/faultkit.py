"""What the reliability tests and ``python -m flows.chaos`` share: killing encoder processes
for real, and fingerprints of an archive and its manifests to compare two runs by.

Encoders are killed with SIGKILL from outside, found through Ray's actor table (their process
ids), so Ray sees exactly what it sees when a machine's processes die. Fingerprints leave out
what differs between two correct runs (run ids, times, worker names, seconds) and keep what
must not: every stored chunk's bytes, every attribute that describes the image, and each
instance's final manifest row.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.fsutil import StorageOptions, open_fs
from storage.manifest import read_manifest

__all__ = [
    "Invariants",
    "Kill",
    "archive_fingerprint",
    "archive_invariants",
    "busy_encoder_pids",
    "complete_instances",
    "encoder_pids",
    "kill",
    "kill_and_resume",
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


def encoder_pids() -> list[int]:
    """Process ids of this Ray cluster's live encoder actors."""
    import ray
    from ray._private import state  # the public state API needs the dashboard, off here

    if not ray.is_initialized():
        return []
    return [
        int(actor["Pid"])
        for actor in state.actors().values()
        if actor.get("ActorClassName") == "Encoder" and actor.get("State") == "ALIVE"
        if actor.get("Pid")
    ]


def busy_encoder_pids() -> list[int]:
    """Encoders running a batch right now (Ray titles the process after the method it runs)."""
    busy = []
    for pid in encoder_pids():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"Encoder.process" in title:
            busy.append(pid)
    return busy


def kill(pids: list[int]) -> int:
    """SIGKILL each of ``pids``; how many were still there to kill."""
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


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


#: A migration driver in its own process, for killing (settings as JSON in argv[3]).
_DRIVER = """
import json, sys
from flows.migrate import migrate_flow
migrate_flow(sys.argv[1], sys.argv[2], settings=json.loads(sys.argv[3]))
"""


@dataclass(frozen=True)
class Kill:
    """One driver started and, unless it finished first, SIGKILLed ``after`` seconds in."""

    attempt: int
    moment: str  # "start-up" or "after N more images"
    after: float
    killed: bool
    manifest_parts: int  # parts in the archive when it died: how far the runs had got


def kill_and_resume(
    source: str,
    archive: str,
    settings: Mapping[str, Any],
    kills: int,
    *,
    env: Mapping[str, str],
    seed: int = 0,
) -> list[Kill]:
    """Start the migration ``kills`` times in a row as separate driver processes, each killed
    (whole process group, SIGKILL) at a random moment: a third of them at a random time in
    the first 4 s (start-up, the first Prefect and Ray calls, the scan), the others once the
    run has recorded 1 to 3 more images, plus up to half a second (between or during images
    and manifest writes). Moments are tied to progress, not the clock, so they land mid-run on
    a fast machine and a slow one alike. Each start resumes what the previous ones left.
    ``env`` must point the drivers at a running Ray (``RAY_ADDRESS``) and Prefect API
    (``PREFECT_API_URL``) that outlive them; ``settings`` should record one image per manifest
    part (``manifest.flush_rows`` 1) so that progress is visible."""
    import ray

    rng = random.Random(seed)
    record = []
    with tempfile.TemporaryFile() as errors:
        for attempt in range(kills):
            before = _manifest_parts(archive)
            started = time.monotonic()
            driver = subprocess.Popen(
                [sys.executable, "-c", _DRIVER, source, archive, json.dumps(settings)],
                env=dict(env),
                start_new_session=True,  # its own process group, killed whole
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
            if rng.random() < 1 / 3:
                moment = "start-up"
                _wait(driver, archive, None, rng.uniform(0.2, 4.0))
            else:
                more = rng.randint(1, 3)
                moment = f"after {more} more images"
                _wait(driver, archive, before + more, 180)
                _wait(driver, archive, None, rng.uniform(0.0, 0.5))
            killed = driver.poll() is None
            encoders = encoder_pids()
            if killed:
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            if not killed and driver.returncode != 0:
                errors.seek(0)
                tail = errors.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"driver {attempt} failed on its own: {tail}")
            after = time.monotonic() - started
            record.append(Kill(attempt, moment, after, killed, _manifest_parts(archive)))
            # Ray ends a dead driver's encoders; the next driver must not start while one of
            # them may still write (two writers of one instance): wait for the processes to be
            # gone, then for Ray to free their CPUs.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(
                Path(f"/proc/{pid}").exists() for pid in encoders
            ):
                time.sleep(0.05)
            while time.monotonic() < deadline and ray.available_resources().get(
                "CPU", 0
            ) < ray.cluster_resources().get("CPU", 0):
                time.sleep(0.2)
    return record


def _wait(driver: subprocess.Popen[bytes], archive: str, parts: int | None, seconds: float) -> None:
    """Until the archive has ``parts`` manifest parts, the driver exits, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while driver.poll() is None and time.monotonic() < deadline:
        if parts is not None and _manifest_parts(archive) >= parts:
            return
        time.sleep(0.02)


def _manifest_parts(archive: str) -> int:
    return sum(1 for _ in Path(archive, "manifests").rglob("*.parquet"))


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
