"""Turn a training checkpoint into shipped weights: float16 state, fitted entropy tables and
half-tile upsampler.

    python -m codec.export RUN_DIR/checkpoint.pt MODEL_ID IMAGES [--images-used N]

Both fits use what the *float16-rounded* network produces for training images: the context
tables its codes, so that they describe exactly the codes the shipped model will emit; the
upsampler (:mod:`codec.upsampler`) its reconstructions of halved tiles, every other image's
codes refined as the encoder refines them at low rates (``--upsampler-refine-steps``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from codec.entropy import ContextTables, fit_tables
from codec.io import ImageError, read_png
from codec.model import ModelConfig, RNNConvCodec
from codec.resolution import half_shape, halve
from codec.tiling import pad_tile, tile_boxes
from codec.upsampler import Upsampler, UpsamplerFit
from codec.weights import WEIGHTS_DIR, write_weights

DEFAULT_UPSAMPLER_IMAGES = 64
DEFAULT_UPSAMPLER_REFINE_STEPS = 8


def load_checkpoint_model(path: Path) -> tuple[RNNConvCodec, int]:
    """The checkpoint's network with float16-rounded weights, and its training iterations."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = RNNConvCodec(ModelConfig.from_dict(checkpoint["model_config"]))
    rounded = {k: v.half().float() for k, v in checkpoint["model"].items()}
    model.load_state_dict(rounded)
    model.eval()
    return model, int(checkpoint["train_config"]["iterations"])


def training_tiles(images: list[Path], tile_size: int = 512) -> Iterator[np.ndarray]:
    """The tiles of ``images`` as the codec cuts them, normalised to [-0.5, 0.5]."""
    for path in images:
        try:
            image = read_png(path)
        except ImageError as error:
            print(f"skipping {error}")
            continue
        normalised = image.pixels.astype(np.float32) / image.peak - 0.5
        height, width = image.pixels.shape
        for box in tile_boxes(height, width, tile_size):
            yield normalised[box.slices]


def collect_codes(
    model: RNNConvCodec, images: list[Path], iterations: int
) -> list[list[np.ndarray]]:
    """Each tile's per-iteration 0/1 codes over ``images``."""
    sequences = []
    for full in training_tiles(images):
        tile = torch.from_numpy(pad_tile(full))[None, None]
        codes, _ = model.compress(tile, iterations)
        sequences.append([(c[0] > 0).to(torch.uint8).numpy() for c in codes])
    return sequences


def _spread(paths: list[Path], count: int) -> list[Path]:
    """``count`` of ``paths`` (at most all), evenly spaced."""
    picks = np.linspace(0, len(paths) - 1, min(count, len(paths))).astype(int)
    return [paths[i] for i in picks]


def fit_upsampler(
    model: RNNConvCodec, images: list[Path], iterations: int, refine_steps: int
) -> Upsampler:
    """The least-squares upsampler from the network's halved-tile reconstructions after each
    iteration to the full-resolution tiles (tiles of even sides only: the fit pairs each half
    pixel with its four originals).

    Every other image's codes are refined ``refine_steps`` steps: refined reconstructions
    are sharper, and a filter fitted on one kind serves the other less well (stop 18, 52 val
    tiles: fitted on unrefined codes +0.07 to +0.20 dB on refined ones after iterations 1-4,
    on refined +0.16 to +0.27; the mix +0.13 to +0.24 on refined and +0.15 to +0.22 on
    unrefined)."""
    fit = UpsamplerFit(iterations)
    for number, path in enumerate(images):
        steps = refine_steps if number % 2 else 0
        for full in training_tiles([path]):
            if full.shape[0] % 2 or full.shape[1] % 2:
                continue
            rows, cols = half_shape(*full.shape)
            tile = torch.from_numpy(pad_tile(halve(full)))[None, None]
            _, reconstructions = model.compress(tile, iterations, None, steps)
            fit.add([r[0, 0, :rows, :cols].detach().numpy() for r in reconstructions], full)
    return fit.solve()


def export(
    checkpoint: Path,
    model_id: str,
    images_dir: Path,
    images_used: int,
    directory: Path,
    upsampler_images: int = DEFAULT_UPSAMPLER_IMAGES,
    upsampler_refine_steps: int = DEFAULT_UPSAMPLER_REFINE_STEPS,
) -> Path:
    """``images_used`` training images for the tables and ``upsampler_images`` for the
    upsampler (0: none, half tiles upsampled bicubically), each spread evenly over
    ``images_dir``."""
    if images_used < 1 or upsampler_images < 0 or upsampler_refine_steps < 0:
        raise SystemExit(
            f"--images-used {images_used} must be at least 1, --upsampler-images "
            f"{upsampler_images} and --upsampler-refine-steps {upsampler_refine_steps} at least 0"
        )
    model, iterations = load_checkpoint_model(checkpoint)
    paths = sorted(images_dir.rglob("*.png"))
    if not paths:
        raise SystemExit(f"{images_dir} holds no PNG images to fit the tables on")
    sequences = collect_codes(model, _spread(paths, images_used), iterations)
    tables: ContextTables = fit_tables(sequences, model.config.bits)
    upsampler = None
    if upsampler_images:
        chosen = _spread(paths, upsampler_images)
        upsampler = fit_upsampler(model, chosen, iterations, upsampler_refine_steps)
    return write_weights(model, tables, model_id, iterations, directory, upsampler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("model_id")
    parser.add_argument("images", type=Path, help="training images for the entropy tables")
    parser.add_argument("--images-used", type=int, default=40)
    parser.add_argument("--directory", type=Path, default=WEIGHTS_DIR)
    parser.add_argument(
        "--upsampler-images",
        type=int,
        default=DEFAULT_UPSAMPLER_IMAGES,
        help="training images for the half-tile upsampler, 0 for none (stop 18, 52 val tiles: "
        "fitted on 2 images -0.17 to -0.06 dB against bicubic, on 48 +0.15 to +0.20)",
    )
    parser.add_argument(
        "--upsampler-refine-steps",
        type=int,
        default=DEFAULT_UPSAMPLER_REFINE_STEPS,
        help="refinement steps of every other image's half-tile codes in the upsampler's fit",
    )
    args = parser.parse_args(argv)
    path = export(
        args.checkpoint,
        args.model_id,
        args.images,
        args.images_used,
        args.directory,
        args.upsampler_images,
        args.upsampler_refine_steps,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
