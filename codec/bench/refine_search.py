"""How well the encoder-side code search (codec/refine.py) does per step budget and momentum.

    python -m codec.bench.refine_search MODEL_ID IMAGES... [--searches 8,8:0.9,16,32:0.9] [--full]

Each image gives one tile: the top-right 512x512 halved to 256x256 (what most tiles are coded as
at 0.125-0.25 bpp), or with ``--full`` a 256x256 crop of the right lung at full resolution. The
tiles go through the network's first four iterations as one batch, every code refined; printed
is the PSNR (pixels scaled to [0, 1], mean over tiles) after each iteration and the seconds. A
search is ``STEPS`` (the shipped momentum for that budget, :func:`codec.refine.momentum`) or
``STEPS:BETA1`` (that momentum instead); ``0`` is the encoder's own codes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from codec import refine
from codec.io import read_png
from codec.resolution import halve
from codec.weights import load_model

ITERATIONS = 4


def _tiles(paths: list[Path], full: bool) -> torch.Tensor:
    tiles = []
    for path in paths:
        image = read_png(path)
        if image.pixels.shape[0] < 1024 or image.pixels.shape[1] < 1024:
            raise SystemExit(f"{path}: the probe's tiles need images of at least 1024x1024")
        pixels = image.pixels.astype(np.float32) / image.peak - 0.5
        tiles.append(pixels[600:856, 200:456] if full else halve(pixels[0:512, 512:1024]))
    return torch.from_numpy(np.stack(tiles))[:, None]


def search_psnr(model_id: str, tiles: torch.Tensor, steps: int, beta1: float | None) -> list[float]:
    """Mean PSNR over ``tiles`` after each iteration, codes refined ``steps`` steps."""
    model = load_model(model_id).model
    shipped = refine.MOMENTUM_RANGE
    if beta1 is not None:
        refine.MOMENTUM_RANGE = (beta1, beta1)  # this run's momentum, whatever the budget
    try:
        _, reconstructions = model.compress(tiles, ITERATIONS, None, steps)
    finally:
        refine.MOMENTUM_RANGE = shipped
    return [
        float((-10 * torch.log10(((r - tiles) ** 2).flatten(1).mean(1))).mean())
        for r in reconstructions
    ]


def _search(text: str) -> tuple[int, float | None]:
    steps, _, beta1 = text.partition(":")
    return int(steps), float(beta1) if beta1 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_id")
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--searches", default="0,8,8:0.9,16,16:0.9,32,32:0.9")
    parser.add_argument("--full", action="store_true", help="full-resolution lung crops")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tiles = _tiles(args.images, args.full)
    print("steps | beta1 | PSNR after iterations 1-4 (dB) | seconds")
    for text in args.searches.split(","):
        steps, beta1 = _search(text)
        shown = "-" if not steps else f"{beta1 if beta1 is not None else refine.momentum(steps)}"
        started = time.perf_counter()
        psnr = search_psnr(args.model_id, tiles, steps, beta1)
        seconds = time.perf_counter() - started
        print(f"{steps} | {shown} | {' / '.join(f'{p:.2f}' for p in psnr)} | {seconds:.1f}")


if __name__ == "__main__":
    main()
