"""The migration driver killed with SIGKILL at random moments, 20 times in a row, each kill
followed by a resume: the archive and manifests it ends with equal those of one uninterrupted
run of the same export (every stored chunk byte, every attribute but the run's identity and
time, every instance's final manifest row), and each image is recorded archived exactly once.

The killed drivers are separate processes joining this module's Ray (RAY_ADDRESS) and the
session's Prefect harness (PREFECT_API_URL). They archive one image per call with a manifest
part per image, so that kills land between and during images as well as in startup.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import small_pngs

from flows.faultkit import kill_and_resume
from flows.migrate import migrate_flow
from storage.invariants import archive_fingerprint, manifest_outcome
from storage.manifest import read_manifest
from storage.synth import write_export

pytestmark = pytest.mark.usefixtures("prefect_api")

IMAGES = 40
KILLS = 20
ONE_AT_A_TIME: dict[str, Any] = {
    "codec": {"tile_size": 32, "rate": {"iterations": 2}},
    "ray": {"workers": 1, "cpus_per_worker": 0.5, "batch_images": 1, "in_flight": 1},
    "manifest": {"flush_rows": 1},
    "report": {"enabled": False},
}


def test_twenty_kills_and_resumes_equal_one_uninterrupted_run(
    tmp_path: Path, prefect_api: str, local_ray: str
) -> None:
    export = tmp_path / "export"
    write_export(str(export), small_pngs(IMAGES, side=96))
    killed_archive, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RAY_ADDRESS": local_ray}

    kills = kill_and_resume(str(export), killed_archive, ONE_AT_A_TIME, KILLS, env=env, seed=3)
    final = migrate_flow(str(export), killed_archive, settings=ONE_AT_A_TIME)
    migrate_flow(str(export), reference, settings=ONE_AT_A_TIME)

    assert sum(kill.killed for kill in kills) >= KILLS // 2, kills
    mid_way = [k for k in kills if k.killed and 0 < k.manifest_parts < IMAGES]
    assert mid_way, f"no run was cut mid-way: {kills}"
    assert final.failed == 0
    rows = read_manifest(killed_archive).to_pylist()
    archived = Counter(row["sop_instance_uid"] for row in rows if row["status"] == "archived")
    assert len(archived) == IMAGES and set(archived.values()) == {1}  # exactly once
    assert manifest_outcome(killed_archive) == manifest_outcome(reference)
    assert archive_fingerprint(killed_archive) == archive_fingerprint(reference)
