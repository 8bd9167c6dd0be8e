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

from codec.model import ModelConfig, RNNConvCodec

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

    second = start(images, run, "--minutes", "10", "--resume", "--loss", "log-mse")
    output = stop_after_first_steps(second)
    assert second.returncode == 0, output
    said = (
        "checkpoint was trained with --loss l1 --hard-fraction 0.0 --block-stop-fraction 0.0 "
        "--half-fraction 0.0"
    )
    assert said + "; continuing " in output
    assert "--loss log-mse" in output  # a fine-tune is allowed, but said out loud
    assert f"resumed {run / 'checkpoint.pt'} at step {saved['step']}" in output
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] > saved["step"]


def test_until_step_stops_training_at_that_step_with_a_checkpoint(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DATA / "00007617_000.png", images)
    run = tmp_path / "run"

    first = start(images, run, "--minutes", "10", "--until-step", "3")
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    assert f"stopped at step 3; checkpoint {run / 'checkpoint.pt'}" in output
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3

    # A resumed run already at the step trains no further and leaves the checkpoint's step.
    again = start(images, run, "--minutes", "10", "--resume", "--until-step", "2")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3

    refused = start(images, tmp_path / "other", "--until-step", "0")
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode != 0
    assert "--until-step must be a positive step count, got 0" in output


def test_compiled_and_bf16_training_passes_save_the_plain_float32_model(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DATA / "00007617_000.png", images)
    run = tmp_path / "run"
    compiled = start(images, run, "--until-step", "2", "--compile")
    output, _ = compiled.communicate(timeout=900)
    assert compiled.returncode == 0, output
    assert "compiled training pass" in output
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2

    # Saved under the plain model's names (no torch.compile wrapper), so the weights load
    # strictly and export like any other run's; and they trained: the per-iteration gains of
    # the two iterations run have moved from their fixed, seed-independent start.
    model = RNNConvCodec(ModelConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["model"])
    initial = RNNConvCodec(ModelConfig.from_dict(saved["model_config"])).log_gains.detach()
    trained = saved["model"]["log_gains"]
    assert not torch.equal(trained[:2], initial[:2]) and torch.equal(trained[2:], initial[2:])

    # And the run resumes without --compile, from the compiled pass's step, here under
    # bfloat16 autocast: the weights and the optimiser's moments stay float32.
    eager = start(images, run, "--until-step", "3", "--resume", "--bf16")
    output, _ = eager.communicate(timeout=300)
    assert eager.returncode == 0, output
    assert "compiled training pass" not in output and "bfloat16 autocast" in output
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 3 and resumed["train_config"]["bf16"] is True
    assert all(value.dtype == torch.float32 for value in resumed["model"].values())
    moments = resumed["optimizer"]["state"].values()
    assert all(state["exp_avg"].dtype == torch.float32 for state in moments)
    assert any(
        not torch.equal(resumed["model"][name], value) for name, value in saved["model"].items()
    )


def test_edge_blocks_find_the_burned_in_text_and_hard_crops_hold_them() -> None:
    import numpy as np

    from codec.io import read_png
    from codec.train import EDGE_BLOCK, EDGE_STEP, edge_blocks, sample_batch

    # A real radiograph with burned-in labels; the blocks found must hold a real jump.
    image = read_png(DATA / "00007617_000.png").pixels.astype(np.float32) / 255 - 0.5
    found = edge_blocks(image)
    assert 0 < len(found) < 0.2 * (image.shape[0] // EDGE_BLOCK) * (image.shape[1] // EDGE_BLOCK)
    for y, x in found[:: max(1, len(found) // 20)]:
        block = image[y : y + EDGE_BLOCK + 1, x : x + EDGE_BLOCK + 1]
        jumps = max(np.abs(np.diff(block, axis=0)).max(), np.abs(np.diff(block, axis=1)).max())
        assert jumps >= EDGE_STEP

    rng = np.random.default_rng(0)
    batch = sample_batch([image], 64, 8, rng, hard_fraction=0.5, edges=[found]).numpy()
    steps = [
        max(np.abs(np.diff(c[0], axis=0)).max(), np.abs(np.diff(c[0], axis=1)).max()) for c in batch
    ]
    assert all(step >= EDGE_STEP for step in steps[:4])  # the hard half, before any flip matters
    smooth = np.zeros((256, 256), dtype=np.float32)
    assert len(edge_blocks(smooth)) == 0
    plain = sample_batch([smooth], 64, 4, rng, hard_fraction=1.0, edges=[edge_blocks(smooth)])
    assert plain.shape == (4, 1, 64, 64)  # no edges anywhere: falls back to random crops


def test_half_crops_are_twice_the_area_halved_like_half_resolution_tiles() -> None:
    import numpy as np

    from codec.resolution import halve
    from codec.train import sample_batch

    # A ramp rising 1/1000 per column: a crop's neighbours differ by that, a halved crop's by
    # twice that, whatever the flips (so the last half of the batch is told apart by its slope).
    ramp = np.tile(np.arange(512, dtype=np.float32) / 1000 - 0.25, (512, 1))
    batch = sample_batch([ramp], 32, 8, np.random.default_rng(1), half_fraction=0.5).numpy()
    slopes = [float(np.abs(np.diff(crop[0], axis=1)).mean()) for crop in batch]
    assert np.allclose(slopes[:4], 0.001, atol=1e-5)
    assert np.allclose(slopes[4:], 0.002, atol=1e-5)
    # and each halved crop is a 2x2 mean of some 64x64 window of the image
    crop = batch[-1, 0]
    left = round((float(crop.min()) + 0.25) * 1000 - 0.5)  # its first pair of columns
    expected = halve(ramp[:64, left : left + 64])
    if crop[0, 0] > crop[0, -1]:  # flipped left to right
        expected = expected[:, ::-1]
    np.testing.assert_allclose(crop, expected, atol=1e-6)


def test_checkpoint_eval_measures_whole_images_that_improve_with_iterations() -> None:
    import math

    from codec.bench.checkpoint_eval import squared_errors

    checkpoint = Path(__file__).parents[1] / "codec/checkpoints/rnnconv-pool/checkpoint.pt"
    errors = squared_errors(checkpoint, [DATA / "00004934_000.png"], 3)
    assert errors[0] > errors[1] > errors[2] > 0
    assert 10 * math.log10(1 / errors[2]) > 28  # a trained network, not a random one


def test_checkpoint_eval_says_where_the_error_is(tmp_path: Path) -> None:
    import numpy as np

    from codec.bench.checkpoint_eval import evaluate
    from codec.io import read_png

    checkpoint = Path(__file__).parents[1] / "codec/checkpoints/rnnconv-pool/checkpoint.pt"
    image = DATA / "00007617_000.png"
    result = evaluate(checkpoint, [image], 2, error_map=tmp_path / "map.png")
    assert len(result.block_errors) == (1024 // 16) ** 2
    assert 0.01 < result.worst_share(0.01) < result.worst_share(0.05) < 1
    assert 0.9 < result.ms_ssim[0] < result.ms_ssim[1] < 1  # a trained network's first two
    panel = read_png(tmp_path / "map.png").pixels
    assert panel.shape == (512, 1536)
    assert panel[:, 1024:].mean() < panel[:, :512].mean()  # the error panel is mostly dark
    assert np.abs(panel[:, :512].astype(int) - panel[:, 512:1024]).mean() < 8  # decoded ~ original
