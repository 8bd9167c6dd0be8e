"""Speed and seam benchmark of the learned codec; prints Markdown tables.

    python -m codec.bench.speed IMAGES... [--bpp 0.25] [--model rnnconv-pool-v8] [--tile 512] \
        [--adaptive] [--refine-steps N]
    python -m codec.bench.speed IMAGES... --codec rnnconv-pool-v12+half+refine+residual [--bpp 0.25]

Speed: encode and decode megapixels per second on this machine (torch's default threads),
and the decode time of each image at the target rate. ``--codec`` takes any learned
``radiarc bench`` name instead (its encode is the bench's, rate search included). Seams: mean
squared error in bands of ``band`` pixels on either side of every interior tile border, against
the rest of the image; a ratio near 1 means tile borders are invisible to the error.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codec.io import GrayImage, read_png
from codec.learned import DEFAULT_TILE_SIZE, decode_image, encode_image
from codec.learned_rd import is_learned_codec_name, learned_codec
from codec.metrics import bits_per_pixel
from codec.rate import RateControl
from codec.weights import DEFAULT_MODEL_ID, load_model


@dataclass(frozen=True)
class SpeedPoint:
    megapixels: float
    bpp: float
    encode_seconds: float
    decode_seconds: float
    seam_ratio: float


def border_mask(shape: tuple[int, int], tile: int, band: int) -> np.ndarray:
    """True within ``band`` pixels of an interior tile border."""
    mask = np.zeros(shape, dtype=bool)
    for edge in range(tile, shape[0], tile):
        mask[max(0, edge - band) : edge + band, :] = True
    for edge in range(tile, shape[1], tile):
        mask[:, max(0, edge - band) : edge + band] = True
    return mask


def seam_ratio(original: np.ndarray, decoded: np.ndarray, tile: int, band: int = 4) -> float:
    """MSE near tile borders over MSE elsewhere (nan for a single-tile image)."""
    mask = border_mask(original.shape, tile, band)
    if not mask.any():
        return float("nan")
    error = (original.astype(np.float64) - decoded.astype(np.float64)) ** 2
    return float(error[mask].mean() / max(error[~mask].mean(), 1e-12))


def measure(
    image: GrayImage,
    bpp: float,
    model_id: str,
    tile: int,
    adaptive: bool = False,
    refine_steps: int = 0,
) -> SpeedPoint:
    started = time.perf_counter()
    rate = RateControl(bpp=bpp, adaptive=adaptive)
    result = encode_image(image, rate, model_id, tile, refine_steps)
    encoded = time.perf_counter()
    decoded = decode_image(result.data)
    finished = time.perf_counter()
    return SpeedPoint(
        megapixels=image.pixels.size / 1e6,
        bpp=bits_per_pixel(result.n_bytes, image.pixels.size),
        encode_seconds=encoded - started,
        decode_seconds=finished - encoded,
        seam_ratio=seam_ratio(image.pixels, decoded.pixels, tile),
    )


def measure_codec(image: GrayImage, bpp: float, codec_name: str) -> SpeedPoint:
    """:func:`measure` for a learned bench codec (:func:`codec.learned_rd.learned_codec`),
    at 512-pixel tiles."""
    codec = learned_codec(codec_name)
    started = time.perf_counter()
    data, _ = codec.encode_at_bpp(image, bpp)
    encoded = time.perf_counter()
    decoded = codec.decode(data, image.pixels.shape, image.bits_stored)
    finished = time.perf_counter()
    return SpeedPoint(
        megapixels=image.pixels.size / 1e6,
        bpp=bits_per_pixel(len(data), image.pixels.size),
        encode_seconds=encoded - started,
        decode_seconds=finished - encoded,
        seam_ratio=seam_ratio(image.pixels, decoded, DEFAULT_TILE_SIZE),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--bpp", type=float, default=0.25)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument(
        "--adaptive", action="store_true", help="block stops (several network runs per encode)"
    )
    parser.add_argument("--refine-steps", type=int, default=0, help="encoder code refinement")
    parser.add_argument(
        "--codec",
        help="a learned bench codec name (e.g. rnnconv-pool-v12+half+refine+residual) in place "
        "of --model, --tile, --adaptive and --refine-steps",
    )
    args = parser.parse_args(argv)
    if args.codec is not None and not is_learned_codec_name(args.codec):
        parser.error(f"--codec {args.codec!r} is not a learned bench codec name")
    # Load once, so the first image does not pay for it.
    load_model(args.model if args.codec is None else args.codec.split("+")[0])
    points = []
    for path in args.images:
        image = read_png(path)
        if args.codec is not None:
            point = measure_codec(image, args.bpp, args.codec)
        else:
            point = measure(
                image, args.bpp, args.model, args.tile, args.adaptive, args.refine_steps
            )
        points.append(point)
        print(f"{path.name}: {point}", flush=True)
    mp = sum(p.megapixels for p in points)
    setting = (
        f"{args.codec}, tile {DEFAULT_TILE_SIZE}"
        if args.codec is not None
        else f"{args.model}{' with block stops' if args.adaptive else ''}"
        f"{f', codes refined {args.refine_steps} steps' if args.refine_steps else ''}, "
        f"tile {args.tile}"
    )
    print(
        f"\n{setting}, "
        f"target {args.bpp} bpp, "
        f"{torch.get_num_threads()} threads, {len(points)} images\n"
    )
    print("| encode MP/s | decode MP/s | decode s/image (median) | mean bpp | seam MSE ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| {mp / sum(p.encode_seconds for p in points):.3f} "
        f"| {mp / sum(p.decode_seconds for p in points):.3f} "
        f"| {statistics.median(p.decode_seconds for p in points):.2f} "
        f"| {statistics.mean(p.bpp for p in points):.4f} "
        f"| {statistics.mean(p.seam_ratio for p in points):.3f} |"
    )


if __name__ == "__main__":
    main()
