"""The fitted half-tile upsampler (codec.upsampler) and its export with the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from codec import resolution
from codec.export import export, load_checkpoint_model
from codec.io import read_png
from codec.model import RNNConvCodec
from codec.tiling import pad_tile
from codec.upsampler import PHASES, TAPS, Upsampler, UpsamplerFit
from codec.weights import _upsampler, load_model

pytestmark = pytest.mark.usefixtures("one_thread_torch")


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.random((1, 1, height // 4, width // 4), dtype=np.float32))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0, 0]


def test_a_fit_to_bicubic_reproduces_bicubic() -> None:
    """Bicubic is a linear 4x4-tap map per phase, inside the fit's 6x6: fitted on pairs made
    by it, the filter must give it back, which pins the phase order and kernel layout."""
    rng = np.random.default_rng(3)
    fit = UpsamplerFit(2)
    for _ in range(4):
        half = smooth_image(rng, 40, 48) - 0.5
        full = resolution.double(half[None, None])[0, 0].numpy()
        fit.add([half.numpy(), half.numpy()], full)
    upsampler = fit.solve()
    assert upsampler.kernels.shape == (2, PHASES, TAPS, TAPS)
    half = smooth_image(rng, 30, 26) - 0.5
    bicubic = resolution.double(half[None, None])[0, 0].numpy()
    fitted = resolution.double(half[None, None], upsampler, 1)[0, 0].numpy()
    assert fitted.shape == bicubic.shape == (60, 52)
    assert np.abs(fitted - bicubic).max() < 1e-4


def test_the_filter_is_chosen_by_iteration_count_and_the_last_serves_beyond() -> None:
    kernels = np.zeros((2, PHASES, TAPS, TAPS), np.float32)
    biases = np.array([[0.1] * PHASES, [0.2, 0.3, 0.4, 0.5]], np.float32)
    upsampler = Upsampler(kernels, biases)
    half = np.zeros((3, 4), np.float32)
    assert np.all(upsampler.double(half, 1) == np.float32(0.1))
    for iterations in (2, 7):
        doubled = upsampler.double(half, iterations)
        # Rows alternate parity 0 / 1, columns likewise: the four phases' biases in place.
        assert np.all(doubled[0::2, 0::2] == np.float32(0.2))
        assert np.all(doubled[0::2, 1::2] == np.float32(0.3))
        assert np.all(doubled[1::2, 0::2] == np.float32(0.4))
        assert np.all(doubled[1::2, 1::2] == np.float32(0.5))
    with pytest.raises(ValueError, match="0 iterations"):
        upsampler.double(half, 0)


def test_bad_shapes_and_empty_fits_are_refused() -> None:
    with pytest.raises(ValueError, match="kernels of shape"):
        Upsampler(np.zeros((1, PHASES, 4, 4), np.float32), np.zeros((1, PHASES), np.float32))
    with pytest.raises(ValueError, match="biases of shape"):
        Upsampler(np.zeros((1, PHASES, TAPS, TAPS), np.float32), np.zeros((2, PHASES)))
    with pytest.raises(ValueError, match="nothing to fit"):
        UpsamplerFit(1).solve()
    with pytest.raises(ValueError, match="sides must be even"):
        UpsamplerFit(1).add([np.zeros((2, 2))], np.zeros((5, 4)))


def test_a_batch_upsamples_each_tile_as_it_would_alone() -> None:
    """The encoder doubles a batch, the decoder one tile: the pixels must agree exactly."""
    rng = np.random.default_rng(8)
    upsampler = Upsampler(
        rng.normal(size=(1, PHASES, TAPS, TAPS)).astype(np.float32) / TAPS**2,
        rng.normal(size=(1, PHASES)).astype(np.float32),
    )
    batch = torch.from_numpy(rng.random((3, 1, 16, 16), dtype=np.float32))
    together = resolution.double(batch, upsampler, 3)
    for index in range(3):
        alone = resolution.double(batch[index : index + 1], upsampler, 3)
        assert torch.equal(together[index], alone[0])


def _halved_tiles(path: Path) -> list[np.ndarray]:
    image = read_png(path)
    pixels = image.pixels.astype(np.float32) / image.peak - 0.5
    return [pixels[y : y + 512, x : x + 512] for y in (0, 512) for x in (0, 512)]


def _squared_errors(
    network: RNNConvCodec,
    tiles: list[np.ndarray],
    upsampler: Upsampler | None,
    iterations: int,
    refine_steps: int,
) -> np.ndarray:
    """Summed squared error after each iteration of the tiles coded at half resolution."""
    halves = np.stack([pad_tile(resolution.halve(tile)) for tile in tiles])[:, None]
    tensor = torch.from_numpy(halves)
    _, reconstructions = network.compress(tensor, iterations, None, refine_steps)
    originals = np.stack(tiles)
    return np.array(
        [
            np.sum((resolution.double(r, upsampler, k)[:, 0].detach().numpy() - originals) ** 2)
            for k, r in enumerate(reconstructions, start=1)
        ]
    )


def test_export_fits_an_upsampler_at_least_as_close_as_bicubic_on_its_tiles(
    tmp_path: Path, data_dir: Path
) -> None:
    """Export a checkpoint made of rnnconv-pool-v11's network on two real chest X-rays (the
    second's codes refined): the weights file carries a filter per iteration, and on the tiles
    it was fitted on it leaves less squared error than bicubic (a least-squares fit whose
    family holds bicubic can only do better; a wrong tap layout or phase order would not)."""
    network = load_model("rnnconv-pool-v11").model
    checkpoint = tmp_path / "checkpoint.pt"
    config = {"iterations": 2}
    torch.save(
        {
            "model_config": network.config.to_dict(),
            "model": network.state_dict(),
            "train_config": config,
        },
        checkpoint,
    )
    images = tmp_path / "train"
    images.mkdir()
    names = ("00004934_000.png", "00013122_000.png")
    for name in names:
        (images / name).write_bytes((data_dir / name).read_bytes())
    path = export(checkpoint, "test-up", images, len(names), tmp_path / "weights", len(names), 2)
    registry = json.loads((tmp_path / "weights" / "models.json").read_text())
    assert registry["test-up"]["file"] == path.name
    upsampler = _upsampler(torch.load(path, weights_only=True))
    assert upsampler is not None and upsampler.kernels.shape[0] == 2

    # The export fits the float16-rounded network: compare on that network's reconstructions.
    exported = load_checkpoint_model(checkpoint)[0]
    plain, refined = (_halved_tiles(data_dir / name) for name in names)
    fitted = _squared_errors(exported, plain, upsampler, 2, 0)
    fitted += _squared_errors(exported, refined, upsampler, 2, 2)
    bicubic = _squared_errors(exported, plain, None, 2, 0)
    bicubic += _squared_errors(exported, refined, None, 2, 2)
    assert np.all(fitted < 0.995 * bicubic), (fitted, bicubic)

    plain_path = export(checkpoint, "test-bicubic", images, 1, tmp_path / "weights", 0)
    assert _upsampler(torch.load(plain_path, weights_only=True)) is None
    with pytest.raises(SystemExit, match="--upsampler-images -1"):
        export(checkpoint, "test-bad", images, 1, tmp_path / "weights", -1)


def test_the_shipped_upsampler_beats_bicubic_on_unseen_chest_xrays(data_dir: Path) -> None:
    """rnnconv-pool-v12's filter, fitted on training images, on the three val radiographs
    shipped with the tests: less squared error than bicubic after every iteration."""
    loaded = load_model("rnnconv-pool-v12")
    assert loaded.upsampler is not None
    assert load_model("rnnconv-pool-v11").upsampler is None  # older weights stay bicubic
    names = ("00004934_000.png", "00007617_000.png", "00013122_000.png")
    tiles = [tile for name in names for tile in _halved_tiles(data_dir / name)]
    fitted = _squared_errors(loaded.model, tiles, loaded.upsampler, 4, 0)
    bicubic = _squared_errors(loaded.model, tiles, None, 4, 0)
    assert np.all(fitted < bicubic), (fitted, bicubic)
