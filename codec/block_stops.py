"""Spatially adaptive rate: which 16x16 blocks keep refining, and at what threshold.

A plain RNN codec spends the same 32 bits per 16x16 block at every iteration, on the smooth lung
field as on a burned-in letter. Here a block stops once its error is small relative to its own
contrast (after Johnston et al., CVPR 2018), so bits go where the error is:

    score = mean squared error / (pixel variance + CONTRAST_FLOOR)      (over the block)

A block keeps refining while ``score > 10 ** (-threshold_db / 10)``. The variance term follows
SSIM's structure term (an error hides in texture, shows on smooth tissue); the floor keeps flat
blocks from demanding near-lossless coding. A bpp target is met by searching the threshold:
:class:`ThresholdSearch` finds the thresholds whose streams bracket the byte budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from codec.model import DOWNSAMPLING, StopRule

#: In squared full-scale units: (1/20 of full scale)^2, chosen on val images (docs/codec.md).
CONTRAST_FLOOR = 0.0025
#: Thresholds searched first, then refined by interpolation: they span ~0.08-0.6 bpp on chest
#: X-rays with rnnconv-pool-v3 and v4.
FIRST_THRESHOLDS_DB = (11.0, 17.0)
THRESHOLD_RANGE_DB = (0.0, 40.0)
SEARCH_STEPS = 3  # interpolation steps after the first thresholds
SIZE_TOLERANCE = 0.03  # a stream within 3% of the budget ends the search
#: Refined codes (:mod:`codec.refine`) entropy-code smaller than plain ones at one threshold
#: (better reconstructions stop blocks sooner): 0.80-0.98 of the plain bytes on 3 val images at
#: 11-20 dB with rnnconv-pool-v13 at 8 steps, 0.80-0.86 at 11-14 dB, where 0.125-0.25 bpp lie
#: (docs/codec.md, stop 20). Higher rates saturate, where the ratio matters least.
REFINED_SIZE_RATIO = 0.84
REFINED_TRIES = 3  # refined encodes at most, each about 9x a plain one at 8 refinement steps


def block_stop_rule(
    threshold_db: float | torch.Tensor, valid: torch.Tensor, contrast_floor: float = CONTRAST_FLOOR
) -> StopRule:
    """The rule for ``compress``: 1.0 where a block's score is still above the threshold.

    ``valid`` is ``(N, 1, H, W)``: 1.0 on image pixels, 0.0 on the padding that extends a tile
    to the network grid, which is never worth bits (a block of padding only stops at once).
    ``threshold_db`` may be a ``(N, 1, 1, 1)`` tensor, one per image (training draws them);
    an infinite threshold never stops a block with any error left.
    """
    limit = 10 ** (-torch.as_tensor(threshold_db, dtype=valid.dtype, device=valid.device) / 10)
    share = F.avg_pool2d(valid, DOWNSAMPLING)
    safe_share = share.clamp_min(1e-12)

    def block_mean(values: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(values * valid, DOWNSAMPLING) / safe_share

    @torch.no_grad()  # a decision, not a loss term: no gradient flows through it
    def rule(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        variance = (block_mean(x * x) - block_mean(x) ** 2).clamp_min(0)
        error = block_mean((x - reconstruction) ** 2)
        score = error / (variance + contrast_floor)
        return ((score > limit) & (share > 0)).to(x.dtype)

    return rule


class ThresholdSearch:
    """The threshold whose full stream (every block refined until it stops) fits a byte
    budget: two first guesses, then interpolation of log size against threshold.

    ``size_at(threshold)`` codes the image and returns the full stream's bytes; it is called
    at most ``len(FIRST_THRESHOLDS_DB) + SEARCH_STEPS`` times (callers cache the candidates).
    """

    def __init__(self, size_at: Callable[[float], int]) -> None:
        self.size_at = size_at
        self.tried: dict[float, int] = {}

    def size(self, threshold: float) -> int:
        """The full stream's bytes at ``threshold``, coded once."""
        if threshold not in self.tried:
            self.tried[threshold] = self.size_at(threshold)
        return self.tried[threshold]

    def run(self, budget: int) -> list[float]:
        """Every threshold tried, for the caller to pick the best stream among them."""
        low, high = THRESHOLD_RANGE_DB
        for threshold in FIRST_THRESHOLDS_DB:
            self.size(threshold)
        for _ in range(SEARCH_STEPS):
            below = [t for t, size in self.tried.items() if size <= budget]
            above = [t for t, size in self.tried.items() if size > budget]
            if below and abs(math.log(self.tried[max(below)] / budget)) < SIZE_TOLERANCE:
                break
            if below and above:
                a, b = max(below), min(above)
            else:
                ordered = sorted(self.tried)
                a, b = (ordered[-2], ordered[-1]) if below else (ordered[0], ordered[1])
            log_a, log_b = math.log(self.size(a)), math.log(self.size(b))
            if log_a == log_b:
                guess = b + (b - a) if below else a - (b - a)
            else:
                guess = a + (math.log(budget) - log_a) * (b - a) / (log_b - log_a)
            if below and above:
                guess = min(max(guess, a + 0.05 * (b - a)), b - 0.05 * (b - a))
            guess = round(min(max(guess, low), high), 2)
            if guess in self.tried:
                break
            self.size(guess)
        return sorted(self.tried)


def refined_thresholds(
    plain_size: Callable[[float], int], refined_size: Callable[[float], int], budget: int
) -> list[float]:
    """Thresholds whose refined streams should fit ``budget``, found on plain codes' sizes.

    A refined encode costs about nine plain ones, so the search runs on plain sizes, aimed at
    ``budget / ratio``; each refined encode at the threshold it finds measures the ratio of
    refined to plain bytes there, and the next search aims with it (the ratio changes slowly
    with the threshold). Stops once a refined stream is within :data:`SIZE_TOLERANCE` under
    the budget, after :data:`REFINED_TRIES`, or when a search lands where one already did.
    Returns the thresholds coded refined, for the caller to pick the best stream among them.
    """
    ratio, tried = REFINED_SIZE_RATIO, []
    # Aim inside the accepted band, not at its edge: a stream a byte over the budget is not
    # accepted, and the ratio's drift would put every other aim there.
    within = budget * (1 - SIZE_TOLERANCE / 2)
    for _ in range(REFINED_TRIES):
        aim = max(int(within / ratio), 1)
        search = ThresholdSearch(plain_size)
        search.run(aim)
        fitting = [t for t, size in search.tried.items() if size <= aim]
        threshold = max(fitting) if fitting else min(search.tried)
        if threshold in tried:
            break
        tried.append(threshold)
        size = refined_size(threshold)
        ratio = size / search.tried[threshold]
        if size <= budget and abs(math.log(size / budget)) < SIZE_TOLERANCE:
            break
        if size <= budget and _saturated(search, threshold):
            break  # every block already refines to the last iteration: no threshold adds bytes
    return sorted(tried)


def _saturated(search: ThresholdSearch, threshold: float) -> bool:
    """Whether ``threshold``'s stream is within :data:`SIZE_TOLERANCE` of the largest any
    threshold gives (the top of :data:`THRESHOLD_RANGE_DB`; one more plain encode at most)."""
    ceiling = search.size(THRESHOLD_RANGE_DB[1])
    return search.tried[threshold] >= ceiling * (1 - SIZE_TOLERANCE)
