"""The training loss's MS-SSIM is the archive's metric: same numbers as codec.metrics on a real
X-ray, gradients that lead towards the original, and the mixed loss it feeds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from codec import metrics
from codec.io import read_png
from codec.ssim_loss import ms_ssim, scales_that_fit
from codec.train import training_loss

XRAY = Path(__file__).parent / "data" / "00007617_000.png"
Pair = tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def pair() -> Pair:
    """A 300x280 crop of a real chest X-ray and a noisy, blurred copy (uint8)."""
    from scipy import ndimage

    original = read_png(XRAY).pixels[200:500, 300:580]
    rng = np.random.default_rng(7)
    blurred = ndimage.uniform_filter(original.astype(np.float64), 3)
    damaged = blurred + rng.normal(0, 5, original.shape)
    return original, np.clip(np.round(damaged), 0, 255).astype(np.uint8)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float64))[None, None]


def test_five_scales_match_the_metric_every_report_uses(pair: Pair) -> None:
    original, damaged = pair
    expected = metrics.ms_ssim(original, damaged, 8)
    got = float(ms_ssim(as_tensor(original), as_tensor(damaged), data_range=255.0))
    assert expected < 0.99  # the damage is visible to the metric
    assert got == pytest.approx(expected, abs=1e-9)


def test_one_scale_is_ssim(pair: Pair) -> None:
    original, damaged = pair
    expected = metrics.ssim(original, damaged, 8) ** sum(metrics.MS_SSIM_WEIGHTS)
    got = float(ms_ssim(as_tensor(original), as_tensor(damaged), 255.0, scales=1))
    assert got == pytest.approx(expected, abs=1e-9)


def test_gradient_steps_lead_back_to_the_original(pair: Pair) -> None:
    original, damaged = (as_tensor(image)[..., :128, :128].float() / 255 for image in pair)
    estimate = damaged.clone().requires_grad_(True)
    before = float(ms_ssim(original, damaged, scales=4))
    optimiser = torch.optim.Adam([estimate], lr=2e-3)
    for _ in range(10):
        optimiser.zero_grad()
        (1 - ms_ssim(original, estimate, scales=4)).sum().backward()
        optimiser.step()
    after = float(ms_ssim(original, estimate.detach(), scales=4))
    assert after > before + 0.01, (before, after)


def test_scales_that_fit_a_crop() -> None:
    assert [scales_that_fit(side) for side in (11, 40, 41, 128, 160, 161, 1024)] == [
        1,
        2,
        3,
        4,
        4,
        5,
        5,
    ]


def test_too_small_or_too_many_scales_are_refused() -> None:
    small = torch.zeros(1, 1, 80, 80)
    with pytest.raises(ValueError, match="sides of at least 81"):
        ms_ssim(small, small, scales=4)
    with pytest.raises(ValueError, match=r"scales must be in 1\.\.5"):
        ms_ssim(small, small, scales=6)


def test_mixed_loss_is_the_mean_of_both_decibel_terms(pair: Pair) -> None:
    original, damaged = (as_tensor(image)[..., :128, :128].float() / 255 - 0.5 for image in pair)
    reconstructions = [damaged, (damaged + original) / 2]
    mixed = float(training_loss(original, reconstructions, "log-mse+ms-ssim"))
    log_mse = float(training_loss(original, reconstructions, "log-mse"))
    similarity = [float(ms_ssim(original + 0.5, r + 0.5, scales=4)) for r in reconstructions]
    dissimilarity = [10 * math.log10(1 - s) for s in similarity]
    assert mixed == pytest.approx((log_mse + sum(dissimilarity) / 2) / 2, rel=1e-5)
    closer = [original + 0.5 * (r - original) for r in reconstructions]
    assert float(training_loss(original, closer, "log-mse+ms-ssim")) < mixed
