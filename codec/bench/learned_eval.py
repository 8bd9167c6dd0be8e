"""Per-iteration evaluation of learned models: entropy-coding saving and quality; Markdown out.

    python -m codec.bench.learned_eval IMAGES... [--models a,b] [--iterations 6] [--refine-steps 8]

For each model and iteration count k (every tile keeps k iterations): the raw binarizer rate
(``bits * k / 256`` bpp), the real stream rate after context-model entropy coding (container
included), the saving, and mean PSNR / SSIM / MS-SSIM of the decoded pixels. Running two models
on the same images compares them at equal iterations, e.g. multi-level pooling against the
Toderici-style encoder; ``--refine-steps`` adds each model with its codes refined
(:mod:`codec.refine`) beside it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from codec import bitstream
from codec.io import read_png
from codec.learned import decode_image, encode_candidates
from codec.metrics import bits_per_pixel, measure
from codec.model import DOWNSAMPLING
from codec.rate import RateControl
from codec.weights import installed_models, load_model


def evaluate(
    model_id: str, images: list[Path], iterations: int, refine_steps: int = 0
) -> list[dict[str, float]]:
    bits = load_model(model_id).model.config.bits
    per_k: dict[int, list[dict[str, float]]] = {k: [] for k in range(1, iterations + 1)}
    for path in images:
        image = read_png(path)
        candidates = encode_candidates(image, iterations, model_id, refine_steps=refine_steps)
        full = candidates.select(RateControl(iterations=iterations))
        for k in range(1, iterations + 1):
            data = bitstream.keep_iterations(full.data, k)
            quality = measure(image.pixels, decode_image(data).pixels, image.bits_stored)
            per_k[k].append(
                {
                    "bpp": bits_per_pixel(len(data), image.pixels.size),
                    "psnr": quality.psnr,
                    "ssim": quality.ssim,
                    "ms_ssim": quality.ms_ssim or float("nan"),
                }
            )
    rows = []
    for k, points in per_k.items():
        raw = bits * k / DOWNSAMPLING**2
        coded = statistics.mean(p["bpp"] for p in points)
        rows.append(
            {
                "iterations": k,
                "raw_bpp": raw,
                "bpp": coded,
                "saving": 1 - coded / raw,
                **{m: statistics.mean(p[m] for p in points) for m in ("psnr", "ssim", "ms_ssim")},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="PNG files or folders of PNGs")
    parser.add_argument("--models", default=",".join(installed_models()))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument(
        "--refine-steps", type=int, default=0, help="also run each model with refined codes"
    )
    args = parser.parse_args(argv)
    paths = []
    for path in args.images:
        paths += sorted(path.glob("*.png")) if path.is_dir() else [path]
    print(f"{len(paths)} images\n")
    print("| model | iterations | raw bpp | coded bpp | saving | PSNR dB | SSIM | MS-SSIM |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [(model_id, 0) for model_id in args.models.split(",")]
    if args.refine_steps:
        runs += [(model_id, args.refine_steps) for model_id, _ in runs]
    for model_id, steps in runs:
        label = f"{model_id} refined {steps} steps" if steps else model_id
        for row in evaluate(model_id, paths, args.iterations, steps):
            print(
                f"| {label} | {row['iterations']:.0f} | {row['raw_bpp']:.4f} "
                f"| {row['bpp']:.4f} | {row['saving']:.1%} | {row['psnr']:.2f} "
                f"| {row['ssim']:.4f} | {row['ms_ssim']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
