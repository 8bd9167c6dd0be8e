"""Training on real X-ray crops: a SIGTERM stops it after the current step with a checkpoint,
and ``--resume`` continues from that step with the same model, optimiser and RNG states."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
TINY = ["--crop", "32", "--batch", "1", "--iterations", "2", "--threads", "1"]


def start(images: Path, run: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "codec.train", str(images), str(run), *TINY, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_after_first_steps(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    output = ""
    while " images, " not in output and process.poll() is None:  # printed as training begins
        output += process.stdout.readline()
    time.sleep(2.0)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    return output + rest


def test_sigterm_checkpoints_and_resume_continues(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DATA / "00007617_000.png", images)
    run = tmp_path / "run"

    first = start(images, run, "--minutes", "10")
    output = stop_after_first_steps(first)
    assert first.returncode == 0, output
    assert "stopping after this step" in output
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert saved["step"] >= 1

    second = start(images, run, "--minutes", "10", "--resume")
    output = stop_after_first_steps(second)
    assert second.returncode == 0, output
    assert f"resumed {run / 'checkpoint.pt'} at step {saved['step']}" in output
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] > saved["step"]
