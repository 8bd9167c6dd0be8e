"""Killing Radiarc's processes for real, for the reliability tests and ``python -m flows.chaos``.

Encoders are killed with SIGKILL from outside, found through Ray's actor table (their process
ids), so Ray sees exactly what it sees when a machine's processes die; drivers are killed as
whole process groups and resumed. What the archive must look like afterwards is checked by
:mod:`storage.invariants`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Kill", "busy_encoder_pids", "encoder_pids", "kill", "kill_and_resume"]


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
