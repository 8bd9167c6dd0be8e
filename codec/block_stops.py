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

    def _size(self, threshold: float) -> int:
        if threshold not in self.tried:
            self.tried[threshold] = self.size_at(threshold)
        return self.tried[threshold]

    def run(self, budget: int) -> list[float]:
        """Every threshold tried, for the caller to pick the best stream among them."""
        low, high = THRESHOLD_RANGE_DB
        for threshold in FIRST_THRESHOLDS_DB:
            self._size(threshold)
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
            log_a, log_b = math.log(self._size(a)), math.log(self._size(b))
            if log_a == log_b:
                guess = b + (b - a) if below else a - (b - a)
            else:
                guess = a + (math.log(budget) - log_a) * (b - a) / (log_b - log_a)
            if below and above:
                guess = min(max(guess, a + 0.05 * (b - a)), b - 0.05 * (b - a))
            guess = round(min(max(guess, low), high), 2)
            if guess in self.tried:
                break
            self._size(guess)
        return sorted(self.tried)
