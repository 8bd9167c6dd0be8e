"""A migration killed with SIGKILL in the middle and started again finishes the export with
every image archived exactly once and no duplicate manifest rows; one more run does nothing.

The killed run is a separate driver process that joins this module's Ray (RAY_ADDRESS) and
the session's Prefect harness (PREFECT_API_URL), archiving one image at a time and writing a
manifest part per image, so that it can be killed between (or during) images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import ray
import zarr
from storage_helpers import small_pngs

from flows.migrate import migrate_flow
from storage.manifest import MANIFEST_DIR, read_manifest
from storage.synth import write_export

pytestmark = pytest.mark.usefixtures("prefect_api")

IMAGES = 14
SLOW: dict[str, Any] = {  # one image per call, one call in flight: easy to stop mid-way
    "codec": {"tile_size": 32, "rate": {"iterations": 2}},
    "ray": {"workers": 1, "cpus_per_worker": 0.5, "batch_images": 1, "in_flight": 1},
    "manifest": {"flush_rows": 1},
    "report": {"enabled": False},
}
CHILD = """
import json, sys
from flows.migrate import migrate_flow
migrate_flow(sys.argv[1], sys.argv[2], settings=json.loads(sys.argv[3]))
"""


def parts(archive: Path) -> list[Path]:
    return sorted((archive / MANIFEST_DIR).rglob("*.parquet"))


def wait_for_free_cpus(expected: float, timeout: float = 60) -> None:
    """Ray kills a dead driver's actors; wait until they have let go of their CPUs."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < expected and time.monotonic() < deadline:
        time.sleep(0.2)


def test_killed_run_resumes_to_exactly_once(
    tmp_path: Path, prefect_api: str, local_ray: str, guarded_export: Any
) -> None:
    export, archive = tmp_path / "export", tmp_path / "archive"
    write_export(str(export), small_pngs(IMAGES, side=96))
    guarded_export(export)  # unchanged by the killed run and the resumed ones
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RAY_ADDRESS": local_ray}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(export), str(archive), json.dumps(SLOW)],
        env=env,
        start_new_session=True,  # its own process group, killed whole
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while len(parts(archive)) < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    done_when_killed = len(parts(archive))
    assert 3 <= done_when_killed < IMAGES, "the run was not interrupted mid-way"
    wait_for_free_cpus(2.0)

    resumed = migrate_flow(str(export), str(archive), settings={**SLOW, "ray": {"workers": 2}})

    assert resumed.already_done == done_when_killed
    assert resumed.archived == IMAGES - done_when_killed and resumed.failed == 0
    table = read_manifest(str(archive))
    assert set(table["status"].to_pylist()) == {"archived"}
    per_image = Counter(table["sop_instance_uid"].to_pylist())
    assert len(per_image) == IMAGES and set(per_image.values()) == {1}  # exactly once
    assert len(set(table["run_id"].to_pylist())) == 2
    for row in table.to_pylist():
        path = f"{row['study_instance_uid']}/{row['series_instance_uid']}/{row['sop_instance_uid']}"
        array = zarr.open_array(str(archive / path), mode="r")
        assert array.attrs["radiarc"]["complete"] is True and array[...].shape == (96, 96)

    before = parts(archive)
    again = migrate_flow(str(export), str(archive), settings=SLOW)
    assert again.already_done == IMAGES and again.archived == 0 and again.tiles == 0
    assert parts(archive) == before
