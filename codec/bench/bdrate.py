"""Bjøntegaard delta rate (VCEG-M33): the average bit-rate difference at equal quality.

Each curve's log rate is fitted as a cubic polynomial of the quality metric; both fits are
integrated over the metric interval the two curves share, and the mean log-rate difference is
turned into a percentage: negative means the test codec needs fewer bits than the reference.
With fewer than four points per curve the polynomial degree drops to points - 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["bd_rate", "ms_ssim_db"]


def ms_ssim_db(value: float) -> float:
    """MS-SSIM on a dB-like scale, ``-10 log10(1 - value)``; closer to linear in log rate."""
    return math.inf if value >= 1 else -10 * math.log10(1 - value)


def _fit(rates: Sequence[float], metric: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Finite points, sorted by metric, as (metric, log rate)."""
    points = sorted(
        (q, math.log(r)) for r, q in zip(rates, metric, strict=True) if r > 0 and math.isfinite(q)
    )
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def bd_rate(
    reference_rates: Sequence[float],
    reference_metric: Sequence[float],
    test_rates: Sequence[float],
    test_metric: Sequence[float],
) -> float:
    """BD-rate of the test curve against the reference, in percent; NaN without overlap."""
    reference_q, reference_log_rate = _fit(reference_rates, reference_metric)
    test_q, test_log_rate = _fit(test_rates, test_metric)
    if len(np.unique(reference_q)) < 2 or len(np.unique(test_q)) < 2:
        return math.nan
    low = max(reference_q.min(), test_q.min())
    high = min(reference_q.max(), test_q.max())
    if high <= low:
        return math.nan
    integrals = []
    for quality, log_rate in ((reference_q, reference_log_rate), (test_q, test_log_rate)):
        degree = min(3, len(np.unique(quality)) - 1)
        antiderivative = np.polyint(np.polyfit(quality, log_rate, degree))
        integrals.append(np.polyval(antiderivative, high) - np.polyval(antiderivative, low))
    mean_log_difference = (integrals[1] - integrals[0]) / (high - low)
    return float((math.exp(mean_log_difference) - 1) * 100)
