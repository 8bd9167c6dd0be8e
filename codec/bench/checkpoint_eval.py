"""Watch training on held-out images: a checkpoint's PSNR and MS-SSIM after each iteration.

    python -m codec.bench.checkpoint_eval CHECKPOINT IMAGES... [--iterations 6] [--error-map PNG]

Runs the network straight from a training checkpoint (no export, no entropy coding, so no bpp):
each image whole, deterministic binarizer, reconstructions clipped to the pixel range. PSNR is
computed from the mean squared error over all the images, so rare large errors (burned-in text,
lead markers) weigh as they do in an archive's total error. The training log's PSNR is measured on
that step's random crops and is too noisy to compare checkpoints; this is not. MS-SSIM
(codec.metrics, on the decoded pixels rounded to the image's bit depth) is the mean over images,
as the bench reports it.

It also says where the error is: the share of the last iteration's squared error held by the
worst 1% and 5% of 16x16 blocks, and ``--error-map`` draws the first image, its reconstruction
and the absolute error (x8) side by side.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import torch

from codec.export import load_checkpoint_model
from codec.io import read_png
from codec.metrics import ms_ssim
from codec.tiling import pad_tile

BLOCK = 16


@dataclass
class Evaluation:
    mse: list[float]  # after each iteration, pixels scaled to [0, 1], over all images
    ms_ssim: list[float]  # after each iteration, the mean over images
    block_errors: np.ndarray  # the last iteration's squared error summed per 16x16 block

    def worst_share(self, fraction: float) -> float:
        """Share of the squared error held by the worst ``fraction`` of blocks."""
        ordered = np.sort(self.block_errors)[::-1]
        return float(ordered[: max(1, int(len(ordered) * fraction))].sum() / ordered.sum())


@torch.no_grad()
def evaluate(
    checkpoint: Path, images: list[Path], iterations: int, error_map: Path | None = None
) -> Evaluation:
    model, _ = load_checkpoint_model(checkpoint)
    totals = np.zeros(iterations)
    similarity = np.zeros(iterations)
    blocks = []
    pixels = 0
    for index, path in enumerate(images):
        image = read_png(path)
        normalised = image.pixels.astype(np.float32) / image.peak - 0.5
        height, width = normalised.shape
        tile = torch.from_numpy(pad_tile(normalised))[None, None]
        for k, reconstruction in enumerate(model(tile, iterations)):
            decoded = reconstruction[0, 0, :height, :width].clamp(-0.5, 0.5).numpy()
            totals[k] += float(((decoded - normalised) ** 2).sum())
            pixels_out = np.rint((decoded + 0.5) * image.peak).astype(image.pixels.dtype)
            similarity[k] += ms_ssim(image.pixels, pixels_out, image.bits_stored)
        error = (decoded - normalised) ** 2
        rows, cols = height // BLOCK, width // BLOCK
        cut = error[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK)
        blocks.append(cut.sum(axis=(1, 3)).ravel())
        pixels += normalised.size
        if index == 0 and error_map is not None:
            _draw_error_map(normalised, decoded, error_map)
    return Evaluation(
        [float(t / pixels) for t in totals],
        [float(m / len(images)) for m in similarity],
        np.concatenate(blocks),
    )


def squared_errors(checkpoint: Path, images: list[Path], iterations: int) -> list[float]:
    """Mean squared error (pixels scaled to [0, 1]) after each iteration, over all ``images``."""
    return evaluate(checkpoint, images, iterations).mse


def _draw_error_map(original: np.ndarray, decoded: np.ndarray, path: Path) -> None:
    def to_8bit(array: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)

    panel = np.concatenate([original + 0.5, decoded + 0.5, np.abs(decoded - original) * 8], axis=1)
    rows, cols = panel.shape[0] // 2 * 2, panel.shape[1] // 2 * 2
    half = panel[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
    path.write_bytes(imagecodecs.png_encode(to_8bit(half)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--error-map", type=Path, help="PNG: first image, decoded, |error| x8")
    args = parser.parse_args(argv)
    step = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["step"]
    result = evaluate(args.checkpoint, args.images, args.iterations, args.error_map)
    psnrs = " ".join(f"{10 * math.log10(1 / e):.2f}" for e in result.mse)
    print(f"step {step}: PSNR dB after iterations 1..{args.iterations}: {psnrs}")
    similarities = " ".join(f"{m:.4f}" for m in result.ms_ssim)
    print(f"step {step}: MS-SSIM after iterations 1..{args.iterations}: {similarities}")
    print(
        f"share of the squared error in the worst 1% / 5% of 16x16 blocks: "
        f"{result.worst_share(0.01):.0%} / {result.worst_share(0.05):.0%}"
    )


if __name__ == "__main__":
    main()
