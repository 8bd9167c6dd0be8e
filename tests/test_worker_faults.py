"""Worker faults during a real migration (local Ray, Prefect's harness): encoders SIGKILLed in
the middle of a batch, all of them at once (a node lost), an exception while encoding one
image, and a file that kills every encoder that touches it. The run always finishes; each
image is recorded exactly once; the one that cannot be archived is ``failed`` with its reason
and is archived by the next run once the fault is gone.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zarr
from storage_helpers import small_pngs

from flows import failpoints
from flows.faultkit import busy_encoder_pids, kill
from flows.migrate import RunSummary, migrate_flow
from storage.invariants import archive_invariants, complete_instances
from storage.manifest import read_manifest
from storage.synth import write_export

pytestmark = pytest.mark.usefixtures("prefect_api", "local_ray")

IMAGES = 8
SETTINGS: dict[str, Any] = {
    "codec": {"tile_size": 32, "rate": {"iterations": 2}},
    "ray": {"workers": 2, "cpus_per_worker": 0.5, "batch_images": 2, "max_restarts": 2},
    "manifest": {"flush_rows": 2},
    "report": {"enabled": False},
}


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "export"
    write_export(str(path), small_pngs(IMAGES, side=96))
    return path


def checksum(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def exported_files(export: Path) -> list[Path]:
    return sorted(p for p in export.rglob("*") if p.is_file())


@pytest.fixture
def armed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def arm(points: dict[str, dict[str, str]]) -> None:
        monkeypatch.setenv(failpoints.ENV, json.dumps(points))

    yield arm


def assert_each_image_once(archive: Path, expected: int) -> dict[str, str]:
    """One row per source per run, complete arrays exactly the archived rows (which decode);
    returns the latest status per source checksum."""
    invariants = archive_invariants(str(archive))
    assert invariants.hold, invariants
    assert len(invariants.latest) == expected
    for path in complete_instances(str(archive)):
        assert zarr.open_array(str(archive / path), mode="r")[...].shape == (96, 96)
    return invariants.latest


def run(export: Path, archive: Path, **ray: Any) -> RunSummary:
    settings = json.loads(json.dumps(SETTINGS))
    settings["ray"].update(ray)
    return migrate_flow(str(export), str(archive), settings=settings)


def kill_busy_encoders(stop: threading.Event, all_at_once: bool, kills: list[int]) -> None:
    """Wait for encoders in the middle of a batch and SIGKILL them (all or one), twice."""
    while not stop.is_set() and len(kills) < 2:
        busy = busy_encoder_pids()
        if busy:
            kills.append(kill(busy if all_at_once else busy[:1]))
            time.sleep(1.5)  # let the restarted encoders take work again
        time.sleep(0.02)


@pytest.mark.parametrize("all_at_once", [False, True], ids=["one-encoder", "node-lost"])
def test_encoders_killed_mid_batch_lose_nothing(
    export: Path, tmp_path: Path, all_at_once: bool
) -> None:
    stop, kills = threading.Event(), []
    killer = threading.Thread(target=kill_busy_encoders, args=(stop, all_at_once, kills))
    killer.start()
    try:
        summary = run(export, tmp_path / "archive")
    finally:
        stop.set()
        killer.join()
    assert sum(kills) >= 1, "no encoder was caught mid-batch"
    assert (summary.archived, summary.failed) == (IMAGES, 0)
    status = assert_each_image_once(tmp_path / "archive", IMAGES)
    assert set(status.values()) == {"archived"}


def test_an_exception_encoding_one_image_fails_that_image_alone(
    export: Path, tmp_path: Path, armed: Any
) -> None:
    victim = exported_files(export)[3]
    armed({"encode": {checksum(victim): "raise"}})
    archive = tmp_path / "archive"
    first = run(export, archive)
    assert (first.archived, first.failed) == (IMAGES - 1, 1)
    table = read_manifest(str(archive)).to_pylist()
    (failed,) = [row for row in table if row["status"] == "failed"]
    assert failed["source_checksum"] == checksum(victim)
    assert failed["reason"] == "InjectedFault: fail point 'encode' fired"
    assert failed["sop_instance_uid"]  # the row says which instance, for the audit

    armed({})
    second = run(export, archive)
    assert (second.already_done, second.archived, second.failed) == (IMAGES - 1, 1, 0)
    assert set(assert_each_image_once(archive, IMAGES).values()) == {"archived"}


def test_a_file_that_kills_encoders_fails_alone(export: Path, tmp_path: Path, armed: Any) -> None:
    """A native crash on one file (fail point ``crash``: the process exits) spends the
    encoder's restarts; the pool replaces it and retries that batch image by image."""
    victim = exported_files(export)[2]
    armed({"encode": {checksum(victim): "crash"}})
    archive = tmp_path / "archive"
    summary = run(export, archive, max_restarts=0)
    assert (summary.archived, summary.failed) == (IMAGES - 1, 1)
    status = assert_each_image_once(archive, IMAGES)
    assert status[checksum(victim)] == "failed"
    (row,) = [r for r in read_manifest(str(archive)).to_pylist() if r["status"] == "failed"]
    assert row["reason"].startswith("encoder lost while archiving this file: ")
