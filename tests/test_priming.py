"""Hidden-state priming: extra recurrent passes on the first iteration, the same on both sides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import start, stop_after_first_steps

from codec.block_stops import block_stop_rule
from codec.io import GrayImage
from codec.model import MAX_PRIMING_STEPS, ModelConfig, RNNConvCodec
from codec.weights import load_model

SMALL = ModelConfig(
    bits=8,
    stem_channels=8,
    encoder_channels=(8, 8, 16),
    decoder_channels=(16, 16, 16, 16),
    priming_steps=2,
)


def small_model(config: ModelConfig = SMALL) -> RNNConvCodec:
    torch.manual_seed(0)
    return RNNConvCodec(config).eval()


def tile(image: GrayImage) -> torch.Tensor:
    """The first 128x128 of a real X-ray, normalised as the codec sees it."""
    pixels = image.pixels[:128, :128].astype(np.float32) / image.peak - 0.5
    return torch.from_numpy(np.ascontiguousarray(pixels))[None, None]


class CountingDecoder:
    """Counts decoder passes while leaving them unchanged."""

    def __init__(self, model: RNNConvCodec) -> None:
        self.calls = 0
        self.inner = model.decoder.forward
        model.decoder.forward = self  # type: ignore[method-assign]

    def __call__(
        self, code: torch.Tensor, state: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        self.calls += 1
        return self.inner(code, state)


def test_decoder_agrees_with_encoder_when_primed(xray_8bit: GrayImage) -> None:
    model = small_model()
    x = tile(xray_8bit)
    codes, encoded = model.compress(x, 3)
    decoded = model.decompress(codes)
    for seen_by_encoder, rebuilt in zip(encoded, decoded, strict=True):
        assert torch.equal(seen_by_encoder, rebuilt)


def test_refined_and_stopped_codes_decode_as_the_encoder_saw_them(xray_8bit: GrayImage) -> None:
    """Refinement scores first-iteration codes through the primed decoder, and block stops
    freeze blocks after it: the reader must rebuild exactly what the encoder measured."""
    model = small_model()
    x = tile(xray_8bit)
    # An untrained network's error is large: a threshold this low stops about half the blocks.
    rule = block_stop_rule(torch.full((1, 1, 1, 1), -10.0), torch.ones_like(x))
    codes, encoded = model.compress(x, 3, stop_rule=rule, refine_steps=2)
    stopped = (codes[2] == 0).all(dim=1)
    assert bool(stopped.any()) and not bool(stopped.all())
    for seen_by_encoder, rebuilt in zip(encoded, model.decompress(codes), strict=True):
        assert torch.equal(seen_by_encoder, rebuilt)


def test_priming_adds_decoder_passes_on_the_first_iteration_only(xray_8bit: GrayImage) -> None:
    primed = small_model()
    unprimed = small_model(dataclasses.replace(SMALL, priming_steps=0))
    unprimed.load_state_dict(primed.state_dict())  # priming adds passes, not parameters
    codes, _ = primed.compress(tile(xray_8bit), 3)

    counter = CountingDecoder(primed)
    primed_first = primed.decompress(codes[:1])[0]
    assert counter.calls == 1 + SMALL.priming_steps
    counter.calls = 0
    primed.decompress(codes)
    assert counter.calls == 3 + SMALL.priming_steps

    # The primed passes change what the first code decodes to.
    assert not torch.allclose(primed_first, unprimed.decompress(codes[:1])[0])


def test_configs_without_priming_are_unprimed_and_bounds_are_enforced() -> None:
    older = {k: v for k, v in SMALL.to_dict().items() if k != "priming_steps"}
    assert ModelConfig.from_dict(older).priming_steps == 0
    assert load_model("rnnconv-pool-v5").model.config.priming_steps == 0
    for bad in (-1, MAX_PRIMING_STEPS + 1):
        with pytest.raises(ValueError, match="priming_steps must be in"):
            dataclasses.replace(SMALL, priming_steps=bad)


def test_training_starts_a_primed_run_from_an_unprimed_checkpoint(
    tmp_path: Path, data_dir: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes((data_dir / "00007617_000.png").read_bytes())
    plain, primed = tmp_path / "plain", tmp_path / "primed"

    first = start(images, plain, "--minutes", "10")
    assert first.returncode is None or first.returncode == 0
    stop_after_first_steps(first)
    step = torch.load(plain / "checkpoint.pt", weights_only=False)["step"]

    source = plain / "checkpoint.pt"
    second = start(
        images, primed, "--minutes", "10", "--init-from", str(source), "--priming-steps", "1"
    )
    output = stop_after_first_steps(second)
    assert second.returncode == 0, output
    assert f"started from {source} at step {step}" in output
    assert "priming steps 0 -> 1" in output
    saved = torch.load(primed / "checkpoint.pt", weights_only=False)
    assert saved["model_config"]["priming_steps"] == 1
    assert saved["step"] > step
    assert torch.load(source, weights_only=False)["step"] == step  # the source is untouched

    # Resuming the primed run unprimed would silently change the network: refused.
    third = start(images, primed, "--minutes", "10", "--resume")
    output, _ = third.communicate(timeout=120)
    assert third.returncode != 0
    assert "--resume with --priming-steps 0, but" in output


def test_radiarc_train_offers_priming_and_names_a_missing_source(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--priming-steps" in shown.output and "--init-from" in shown.output
    missing = tmp_path / "nothing.pt"
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(tmp_path), str(run), "--init-from", str(missing)])
    assert result.exit_code == 2
    assert f"--init-from {missing}: no such checkpoint file" in result.output
    assert not run.exists()  # refused before anything was written
