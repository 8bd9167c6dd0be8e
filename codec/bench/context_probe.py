"""How much could richer entropy-coding contexts save? An empirical probe, not a coder.

    python -m codec.bench.context_probe --fit IMAGES... --test IMAGES... [--model ID]

Codes every 512 tile of the images (uniform, 8 iterations), then for each context set fits
adaptive-free count tables on the ``--fit`` images and measures the cross-entropy of the
``--test`` images' bits under them (bits per code bit, per iteration). The shipped coder's
contexts (codec/entropy.py: channel, iteration bucket, the same bit in the previous iteration,
four neighbours from the previous iteration in pass A or from pass A in pass B) are the
baseline; the others add what a decoder could also know:

* ``per-iteration``: a table per iteration instead of buckets 0, 1, 2, 3+;
* ``B+previous``: pass B also sees the previous iteration's four neighbours;
* ``diagonals``: the previous iteration's four diagonal neighbours;
* ``channel-pair``: channels coded in two halves, the second seeing the first half's bit of
  channel ``c - bits/2`` at the same place;
* ``first-half-sum``: the same, seeing the sum of the first half's bits there (5 levels).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from codec.io import read_png
from codec.learned import _normalise
from codec.tiling import pad_tile, tile_boxes
from codec.weights import DEFAULT_MODEL_ID, load_model

ITERATIONS = 8
Features = dict[str, np.ndarray]

CONTEXT_SETS: dict[str, tuple[list[str], list[str]]] = {
    "shipped": (["channel", "bucket", "same", "previous"], ["channel", "bucket", "same", "pass_a"]),
    "per-iteration": (
        ["channel", "iteration", "same", "previous"],
        ["channel", "iteration", "same", "pass_a"],
    ),
    "B+previous": (
        ["channel", "bucket", "same", "previous"],
        ["channel", "bucket", "same", "pass_a", "previous"],
    ),
    "diagonals": (
        ["channel", "bucket", "same", "previous", "diagonal"],
        ["channel", "bucket", "same", "pass_a", "diagonal"],
    ),
    "channel-pair": (
        ["channel", "bucket", "same", "previous", "pair"],
        ["channel", "bucket", "same", "pass_a", "pair"],
    ),
    "first-half-sum": (
        ["channel", "bucket", "same", "previous", "half_sum"],
        ["channel", "bucket", "same", "pass_a", "half_sum"],
    ),
}


def tile_codes(path: Path, model_id: str) -> list[list[np.ndarray]]:
    """Each 512 tile's codes as 0/1 arrays ``(bits, h, w)``, one per iteration."""
    image = read_png(path)
    model = load_model(model_id).model
    sequences = []
    height, width = image.pixels.shape
    for box in tile_boxes(height, width, 512):
        tile = pad_tile(_normalise(image.pixels[box.slices], image.peak))
        codes, _ = model.compress(torch.from_numpy(tile[None, None]), ITERATIONS)
        sequences.append([(code[0] > 0).numpy().astype(np.int64) for code in codes])
    return sequences


def _cross_sum(signed: np.ndarray, diagonal: bool) -> np.ndarray:
    padded = np.pad(signed, ((0, 0), (1, 1), (1, 1)))
    if diagonal:
        parts = (padded[:, :-2, :-2], padded[:, 2:, 2:], padded[:, :-2, 2:], padded[:, 2:, :-2])
    else:
        parts = (
            padded[:, :-2, 1:-1],
            padded[:, 2:, 1:-1],
            padded[:, 1:-1, :-2],
            padded[:, 1:-1, 2:],
        )
    return sum(parts, np.zeros_like(signed)) + 4


def features(sequence: list[np.ndarray]) -> Iterator[tuple[np.ndarray, Features, np.ndarray]]:
    """Per iteration: the bits, every candidate context (small non-negative ints), pass A."""
    previous: np.ndarray | None = None
    for iteration, bits in enumerate(sequence):
        channels, height, width = bits.shape
        signed = bits * 2 - 1
        rows, cols = np.indices((height, width))
        pass_a = np.broadcast_to((rows + cols) % 2 == 0, bits.shape)
        channel = np.broadcast_to(np.arange(channels)[:, None, None], bits.shape)
        before = np.zeros_like(signed) if previous is None else previous * 2 - 1
        half = channels // 2
        first_half = np.concatenate([np.zeros_like(signed[:half]), signed[:half]]) + 1
        total = signed[:half].sum(axis=0)
        level = np.clip((total + half) * 5 // (channels + 1), 0, 4) + 1
        yield (
            bits,
            {
                "channel": channel,
                "bucket": np.full(bits.shape, min(iteration, 3)),
                "iteration": np.full(bits.shape, iteration),
                "same": np.full(bits.shape, 2) if previous is None else previous,
                "previous": _cross_sum(before, diagonal=False),
                "pass_a": _cross_sum(np.where(pass_a, signed, 0), diagonal=False),
                "diagonal": _cross_sum(before, diagonal=True),
                "pair": first_half,
                "half_sum": np.where(channel >= half, level, 0),
            },
            pass_a,
        )
        previous = bits


def _keys(context: Features, names: list[str]) -> np.ndarray:
    key = np.zeros(context["channel"].shape, dtype=np.int64)
    for name in names:
        key = key * 64 + context[name]
    return key


def cross_entropy(
    fit: list[list[np.ndarray]], test: list[list[np.ndarray]], names: tuple[list[str], list[str]]
) -> np.ndarray:
    """Bits per code bit of ``test`` under count tables fitted on ``fit``, per iteration."""
    ones: list[dict[int, float]] = [{}, {}]
    totals: list[dict[int, float]] = [{}, {}]
    for sequence in fit:
        for bits, context, pass_a in features(sequence):
            for index, mask in enumerate((pass_a, ~pass_a)):
                keys, inverse = np.unique(_keys(context, names[index])[mask], return_inverse=True)
                counted_ones = np.bincount(inverse, weights=bits[mask])
                counted = np.bincount(inverse)
                for key, one, total in zip(keys.tolist(), counted_ones, counted, strict=True):
                    ones[index][key] = ones[index].get(key, 0.0) + one
                    totals[index][key] = totals[index].get(key, 0.0) + total
    cost, count = np.zeros(ITERATIONS), np.zeros(ITERATIONS)
    for sequence in test:
        for iteration, (bits, context, pass_a) in enumerate(features(sequence)):
            for index, mask in enumerate((pass_a, ~pass_a)):
                keys = _keys(context, names[index])[mask].tolist()
                p_one = np.array(
                    [
                        (ones[index].get(k, 0.0) + 0.5) / (totals[index].get(k, 0.0) + 1)
                        for k in keys
                    ]
                )
                p_one = np.clip(p_one, 1 / 4096, 1 - 1 / 4096)  # as the shipped tables
                observed = bits[mask]
                cost[iteration] -= np.sum(np.log2(np.where(observed == 1, p_one, 1 - p_one)))
                count[iteration] += observed.size
    return cost / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", nargs="+", type=Path, required=True, help="PNGs to fit on")
    parser.add_argument("--test", nargs="+", type=Path, required=True, help="PNGs to measure")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    args = parser.parse_args(argv)
    fit = [tiles for path in args.fit for tiles in tile_codes(path, args.model)]
    test = [tiles for path in args.test for tiles in tile_codes(path, args.model)]
    print(f"{len(fit)} tiles fitted, {len(test)} measured, {ITERATIONS} iterations\n")
    header = " | ".join(f"it {k + 1}" for k in range(ITERATIONS))
    print(f"| contexts | {header} |\n|---|{'---|' * ITERATIONS}")
    baseline = cross_entropy(fit, test, CONTEXT_SETS["shipped"])
    for name, names in CONTEXT_SETS.items():
        bits = baseline if name == "shipped" else cross_entropy(fit, test, names)
        cells = " | ".join(
            f"{b:.3f}" if name == "shipped" else f"{b:.3f} ({1 - b / base:+.1%})"
            for b, base in zip(bits, baseline, strict=True)
        )
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
