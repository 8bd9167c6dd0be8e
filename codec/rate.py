"""Rate control: how many iterations each tile keeps.

Four modes, exactly one per encode: a fixed iteration count; a target bpp (the largest stream
not above it, spending bytes greedily where they remove the most squared error, optionally
choosing per tile between full and half resolution); or a quality floor (minimum SSIM or PSNR)
that each tile must reach on its decoded pixels.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from codec.metrics import WINDOW, psnr, ssim

#: How far a verified tile may fall below the floor the encoder judged it by: the verifier
#: measures the whole tile as decoded from the store, the encoder the coded block alone.
SSIM_TOLERANCE = 1e-3
PSNR_TOLERANCE = 0.05


@dataclass(frozen=True)
class RateControl:
    iterations: int | None = None
    bpp: float | None = None
    min_ssim: float | None = None
    min_psnr: float | None = None
    #: With ``bpp``: 16x16 blocks stop refining once good enough (codec/block_stops.py).
    adaptive: bool = False
    #: With ``bpp``: tiles may be coded at half resolution where that removes more error per
    #: byte (codec/resolution.py; a format 3 stream when any is).
    half_res: bool = False
    #: Every pixel within this many levels of the original (0: lossless): network iterations,
    #: then a residual layer (codec/near_lossless.py; a format 5 stream, or format 6 when
    #: a tile's layer goes over a coarse correction, codec/coarse.py).
    max_error: int | None = None
    #: With ``bpp``: the smallest max error whose layered stream fits (rates above the
    #: network's reach, up to lossless), with coarse corrections where they pay
    #: (codec/coarse.py; a format 6 stream when any tile has one).
    residual: bool = False

    def __post_init__(self) -> None:
        modes = (self.iterations, self.bpp, self.min_ssim, self.min_psnr, self.max_error)
        if sum(mode is not None for mode in modes) != 1:
            raise ValueError("choose exactly one of iterations, bpp, min_ssim, min_psnr, max_error")
        if self.adaptive and self.bpp is None:
            raise ValueError("adaptive (per-block) rate needs a bpp target")
        if self.half_res and self.bpp is None:
            raise ValueError("half-resolution tiles need a bpp target")
        if self.residual and (self.bpp is None or self.adaptive):
            raise ValueError("residual layers for a bpp target need bpp (and no adaptive)")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.bpp is not None and not 0 < self.bpp < 64:
            raise ValueError(f"bpp must be in (0, 64), got {self.bpp}")
        if self.min_ssim is not None and not 0 < self.min_ssim < 1:
            raise ValueError(f"min_ssim must be in (0, 1), got {self.min_ssim}")
        if self.min_psnr is not None and not 0 < self.min_psnr < 200:
            raise ValueError(f"min_psnr must be in (0, 200) dB, got {self.min_psnr}")
        if self.max_error is not None and not 0 <= self.max_error < 1 << 16:
            raise ValueError(f"max_error must be in 0..65535 levels, got {self.max_error}")

    def describe(self) -> str:
        if self.iterations is not None:
            return f"iterations={self.iterations}"
        if self.bpp is not None:
            modes = (" adaptive" if self.adaptive else "") + (" half-res" if self.half_res else "")
            modes += " residual" if self.residual else ""
            return f"bpp<={self.bpp:g}{modes}"
        if self.min_ssim is not None:
            return f"ssim>={self.min_ssim:g}"
        if self.max_error is not None:
            return "lossless" if self.max_error == 0 else f"max-error<={self.max_error}"
        return f"psnr>={self.min_psnr:g}"


def first_meeting(scores: list[float], floor: float) -> int | None:
    """Iterations (1-based) of the first score at or above ``floor``; None if none is."""
    for index, score in enumerate(scores):
        if score >= floor:
            return index + 1
    return None


def allocate_bytes(
    segment_bytes: list[list[int]], squared_errors: list[list[float]], budget: int
) -> list[int]:
    """Iterations per tile maximising the error removed, with total segment bytes <= budget.

    Every tile keeps at least one iteration (a stream needs it) even if that alone overflows;
    the caller reports whether the budget was met. Later iterations are added greedily by
    error removed per byte, the usual convex-hull approximation of the rate-distortion optimum.
    """
    chosen = [1] * len(segment_bytes)
    spent = sum(sizes[0] for sizes in segment_bytes)
    heap: list[tuple[float, int]] = []

    def push(tile: int) -> None:
        k = chosen[tile]
        if k < len(segment_bytes[tile]):
            gain = squared_errors[tile][k - 1] - squared_errors[tile][k]
            cost = max(segment_bytes[tile][k], 1)
            heapq.heappush(heap, (-gain / cost, tile))

    for tile in range(len(segment_bytes)):
        push(tile)
    while heap:
        _, tile = heapq.heappop(heap)
        cost = segment_bytes[tile][chosen[tile]]
        if spent + cost > budget:
            continue  # this tile's next step does not fit; cheaper steps of others may
        spent += cost
        chosen[tile] += 1
        push(tile)
    return chosen


@dataclass(frozen=True)
class Ladder:
    """One way to code a tile: the bytes of each iteration's segment, and the squared error
    the tile has after each."""

    costs: list[int]
    squared_errors: list[float]


def _hull(ladders: list[Ladder]) -> list[tuple[int, int]]:
    """A tile's operating points ``(ladder, iterations)`` on the lower convex hull of error
    against total bytes, cheapest first: the points a greedy allocation can move along."""
    points = [
        (sum(ladder.costs[:k]), ladder.squared_errors[k - 1], index, k)
        for index, ladder in enumerate(ladders)
        for k in range(1, len(ladder.costs) + 1)
    ]
    current = min(points, key=lambda p: (p[0], p[1]))
    hull = [current]
    while True:
        steeper = [p for p in points if p[0] > current[0] and p[1] < current[1]]
        if not steeper:
            return [(p[2], p[3]) for p in hull]
        current = max(steeper, key=lambda p: ((current[1] - p[1]) / (p[0] - current[0]), -p[0]))
        hull.append(current)


def allocate_ladders(tiles: list[list[Ladder]], budget: int) -> list[tuple[int, int]]:
    """For each tile, the ladder and iteration count that together remove the most error
    with total bytes <= budget: :func:`allocate_bytes` along each tile's convex hull."""
    hulls = [_hull(ladders) for ladders in tiles]
    steps, errors = [], []
    for ladders, hull in zip(tiles, hulls, strict=True):
        totals = [sum(ladders[index].costs[:k]) for index, k in hull]
        steps.append([b - a for a, b in zip([0, *totals], totals, strict=False)])
        errors.append([ladders[index].squared_errors[k - 1] for index, k in hull])
    chosen = allocate_bytes(steps, errors, budget)
    picks = [hull[count - 1] for hull, count in zip(hulls, chosen, strict=True)]
    return _spend_leftover(tiles, picks, budget)


def _spend_leftover(
    tiles: list[list[Ladder]], picks: list[tuple[int, int]], budget: int
) -> list[tuple[int, int]]:
    """Move tiles to points off their hulls while the bytes the greedy pass left unspent pay
    for it. The hull skips points that are poor per byte but still the best a budget buys: a
    lone tile (a zarr chunk) whose next hull point does not fit may afford one of those."""

    def cost(tile: int, pick: tuple[int, int]) -> int:
        return sum(tiles[tile][pick[0]].costs[: pick[1]])

    def error(tile: int, pick: tuple[int, int]) -> float:
        return tiles[tile][pick[0]].squared_errors[pick[1] - 1]

    picks = list(picks)
    leftover = budget - sum(cost(tile, pick) for tile, pick in enumerate(picks))
    improved = leftover > 0
    while improved:
        improved = False
        for tile, ladders in enumerate(tiles):
            affordable = cost(tile, picks[tile]) + leftover
            options = [
                (index, k)
                for index, ladder in enumerate(ladders)
                for k in range(1, len(ladder.costs) + 1)
                if sum(ladder.costs[:k]) <= affordable
            ]
            best = min(options, key=lambda pick: (error(tile, pick), cost(tile, pick)))
            if error(tile, best) < error(tile, picks[tile]):
                leftover -= cost(tile, best) - cost(tile, picks[tile])
                picks[tile] = best
                improved = True
    return picks


def psnr_from_sse(squared_error: float, pixels: int, peak: int) -> float:
    if squared_error == 0:
        return math.inf
    return 10 * math.log10(peak * peak * pixels / squared_error)


@dataclass(frozen=True)
class FloorCheck:
    """Tiles of a decoded image measured against a quality floor."""

    floor: str  # e.g. "ssim>=0.95", "max-error<=2"
    checked: int  # tiles measured (slivers under the SSIM window are not)
    below: int  # tiles that miss it (beyond the tolerances above; any error over a max error)
    worst: float | None  # the lowest tile score, or the largest tile error

    @property
    def met(self) -> bool:
        return self.below == 0

    def describe(self) -> str:
        worst = "" if self.worst is None else f", worst tile {self.worst:.4g}"
        return f"{self.below} of {self.checked} tiles miss {self.floor}{worst}"


def check_floor(
    original: np.ndarray,
    decoded: np.ndarray,
    bits_stored: int,
    tile_size: int,
    rate: RateControl,
) -> FloorCheck | None:
    """Each ``tile_size`` tile of ``decoded`` against ``rate``'s quality floor or max error;
    None when ``rate`` sets neither. What a verifier runs on pixels read back from storage."""
    if rate.min_ssim is None and rate.min_psnr is None and rate.max_error is None:
        return None
    if original.shape != decoded.shape:
        raise ValueError(f"shape mismatch: {original.shape} vs {decoded.shape}")
    if rate.max_error is not None:
        # A bound, not a score: no tolerance, one pixel over it fails.
        errors = np.abs(original.astype(np.int64) - decoded.astype(np.int64))
        largest = [
            int(errors[top : top + tile_size, left : left + tile_size].max())
            for top in range(0, errors.shape[0], tile_size)
            for left in range(0, errors.shape[1], tile_size)
        ]
        over = sum(1 for error in largest if error > rate.max_error)
        return FloorCheck(rate.describe(), len(largest), over, float(max(largest)))
    scores = []
    height, width = original.shape
    for top in range(0, height, tile_size):
        for left in range(0, width, tile_size):
            window = (slice(top, top + tile_size), slice(left, left + tile_size))
            a, b = original[window], decoded[window]
            if rate.min_ssim is not None:
                if min(a.shape) >= WINDOW:
                    scores.append(ssim(a, b, bits_stored))
            else:
                scores.append(psnr(a, b, bits_stored))
    if rate.min_ssim is not None:
        floor, limit = rate.min_ssim, rate.min_ssim - SSIM_TOLERANCE
    else:
        floor, limit = rate.min_psnr or 0.0, (rate.min_psnr or 0.0) - PSNR_TOLERANCE
    below = sum(1 for score in scores if score < limit)
    name = "ssim" if rate.min_ssim is not None else "psnr"
    return FloorCheck(f"{name}>={floor:g}", len(scores), below, min(scores, default=None))
