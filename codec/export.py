"""Turn a training checkpoint into shipped weights: float16 state, fitted entropy tables.

    python -m codec.export RUN_DIR/checkpoint.pt MODEL_ID IMAGES [--images-used N]

The context tables are fitted on codes that the *float16-rounded* network produces for
training images, so that they describe exactly the codes the shipped model will emit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from codec.entropy import ContextTables, fit_tables
from codec.io import ImageError, read_png
from codec.model import ModelConfig, RNNConvCodec
from codec.tiling import pad_tile, tile_boxes
from codec.weights import WEIGHTS_DIR, write_weights


def load_checkpoint_model(path: Path) -> tuple[RNNConvCodec, int]:
    """The checkpoint's network with float16-rounded weights, and its training iterations."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = RNNConvCodec(ModelConfig.from_dict(checkpoint["model_config"]))
    rounded = {k: v.half().float() for k, v in checkpoint["model"].items()}
    model.load_state_dict(rounded)
    model.eval()
    return model, int(checkpoint["train_config"]["iterations"])


def collect_codes(
    model: RNNConvCodec, images: list[Path], iterations: int, tile_size: int = 512
) -> list[list[np.ndarray]]:
    """Each tile's per-iteration 0/1 codes over ``images``."""
    sequences = []
    for path in images:
        try:
            image = read_png(path)
        except ImageError as error:
            print(f"skipping {error}")
            continue
        normalised = image.pixels.astype(np.float32) / image.peak - 0.5
        height, width = image.pixels.shape
        for box in tile_boxes(height, width, tile_size):
            tile = torch.from_numpy(pad_tile(normalised[box.slices]))[None, None]
            codes, _ = model.compress(tile, iterations)
            sequences.append([(c[0] > 0).to(torch.uint8).numpy() for c in codes])
    return sequences


def export(
    checkpoint: Path, model_id: str, images_dir: Path, images_used: int, directory: Path
) -> Path:
    model, iterations = load_checkpoint_model(checkpoint)
    paths = sorted(images_dir.rglob("*.png"))
    chosen = [paths[i] for i in np.linspace(0, len(paths) - 1, images_used).astype(int)]
    sequences = collect_codes(model, chosen, iterations)
    tables: ContextTables = fit_tables(sequences, model.config.bits)
    return write_weights(model, tables, model_id, iterations, directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("model_id")
    parser.add_argument("images", type=Path, help="training images for the entropy tables")
    parser.add_argument("--images-used", type=int, default=40)
    parser.add_argument("--directory", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.model_id, args.images, args.images_used, args.directory)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
