"""Image quality and rate metrics: the one implementation used by tests, bench, codec and audit.

Definitions (DESIGN.md): PSNR with peak ``2**bits_stored - 1``; SSIM of Wang et al. 2004 with an
11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range = peak, averaged over the
region where the window fits (as scikit-image does); MS-SSIM of Wang et al. 2003 with five
scales and the standard weights; bpp from real byte counts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from codec.io import peak_value

SIGMA = 1.5
WINDOW = 11
TRUNCATE = (WINDOW // 2 - 0.5) / SIGMA  # a Gaussian exactly WINDOW taps wide
K1, K2 = 0.01, 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIDE = (WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1  # 161


def _check_pair(reference: np.ndarray, test: np.ndarray) -> None:
    if reference.shape != test.shape:
        raise ValueError(f"shape mismatch: {reference.shape} vs {test.shape}")
    if reference.ndim != 2:
        raise ValueError(f"expected 2-D images, got shape {reference.shape}")


def mse(reference: np.ndarray, test: np.ndarray) -> float:
    _check_pair(reference, test)
    difference = reference.astype(np.float64) - test.astype(np.float64)
    return float(np.mean(difference * difference))


def psnr(reference: np.ndarray, test: np.ndarray, bits_stored: int) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    error = mse(reference, test)
    if error == 0:
        return math.inf
    return 10 * math.log10(peak_value(bits_stored) ** 2 / error)


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> int:
    _check_pair(reference, test)
    return int(np.max(np.abs(reference.astype(np.int64) - test.astype(np.int64)), initial=0))


def bits_per_pixel(n_bytes: int, n_pixels: int) -> float:
    """Real bytes times 8 over pixels: the only rate Radiarc reports."""
    if n_pixels <= 0:
        raise ValueError("an image without pixels has no bit rate")
    return n_bytes * 8 / n_pixels


def _blur(image: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(image, SIGMA, truncate=TRUNCATE, mode="reflect")


def _ssim_terms(x: np.ndarray, y: np.ndarray, data_range: float) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term over the valid region."""
    if min(x.shape) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW}, got {x.shape}")
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    mu_x, mu_y = _blur(x), _blur(y)
    var_x = _blur(x * x) - mu_x * mu_x
    var_y = _blur(y * y) - mu_y * mu_y
    cov = _blur(x * y) - mu_x * mu_y
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    crop = (slice(WINDOW // 2, -(WINDOW // 2)),) * 2
    return (
        float(np.mean((luminance * contrast_structure)[crop])),
        float(np.mean(contrast_structure[crop])),
    )


def ssim(reference: np.ndarray, test: np.ndarray, bits_stored: int) -> float:
    _check_pair(reference, test)
    x, y = reference.astype(np.float64), test.astype(np.float64)
    return _ssim_terms(x, y, peak_value(bits_stored))[0]


def _halve(image: np.ndarray) -> np.ndarray:
    """2x2 average, dropping an odd last row/column."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    image = image[:h, :w]
    return (image[0::2, 0::2] + image[1::2, 0::2] + image[0::2, 1::2] + image[1::2, 1::2]) / 4


def ms_ssim(reference: np.ndarray, test: np.ndarray, bits_stored: int) -> float:
    """Multi-scale SSIM; needs both sides at least :data:`MS_SSIM_MIN_SIDE` pixels."""
    _check_pair(reference, test)
    if min(reference.shape) < MS_SSIM_MIN_SIDE:
        raise ValueError(f"MS-SSIM needs sides of at least {MS_SSIM_MIN_SIDE}: {reference.shape}")
    x, y = reference.astype(np.float64), test.astype(np.float64)
    data_range = peak_value(bits_stored)
    result = 1.0
    for scale, weight in enumerate(MS_SSIM_WEIGHTS):
        full, contrast_structure = _ssim_terms(x, y, data_range)
        last = scale == len(MS_SSIM_WEIGHTS) - 1
        term = full if last else contrast_structure
        result *= max(term, 0.0) ** weight
        if not last:
            x, y = _halve(x), _halve(y)
    return result


@dataclass(frozen=True)
class Quality:
    psnr: float
    ssim: float
    ms_ssim: float | None
    max_abs_error: int


def measure(reference: np.ndarray, test: np.ndarray, bits_stored: int) -> Quality:
    """All distortion metrics at once; MS-SSIM is ``None`` for images too small for it."""
    multi = (
        ms_ssim(reference, test, bits_stored) if min(reference.shape) >= MS_SSIM_MIN_SIDE else None
    )
    return Quality(
        psnr=psnr(reference, test, bits_stored),
        ssim=ssim(reference, test, bits_stored),
        ms_ssim=multi,
        max_abs_error=max_abs_error(reference, test),
    )
