"""Shared fixtures: small real X-ray crops at several bit depths, for fast codec tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codec.io import GrayImage, read_png

DATA = Path(__file__).parent / "data"


def deepened(pixels: np.ndarray, bits_stored: int, seed: int = 0) -> GrayImage:
    """An 8-bit image widened to ``bits_stored`` bits, the new low bits filled with noise,
    as a detector's would be (so a codec cannot win by spotting empty bit planes)."""
    shift = bits_stored - 8
    noise = np.random.default_rng(seed).integers(0, 1 << shift, pixels.shape)
    return GrayImage((pixels.astype(np.uint32) << shift | noise).astype(np.uint16), bits_stored)


@pytest.fixture(scope="session")
def xray_8bit() -> GrayImage:
    """A 256x256 crop of a real NIH chest X-ray (lung, rib and soft-tissue edges)."""
    full = read_png(DATA / "00007617_000.png")
    return GrayImage(np.ascontiguousarray(full.pixels[384:640, 256:512]), 8)


@pytest.fixture(scope="session")
def xray_10bit(xray_8bit: GrayImage) -> GrayImage:
    return deepened(xray_8bit.pixels, 10)


@pytest.fixture(scope="session")
def xray_12bit(xray_8bit: GrayImage) -> GrayImage:
    return deepened(xray_8bit.pixels, 12)


@pytest.fixture(scope="session")
def xray_16bit(xray_8bit: GrayImage) -> GrayImage:
    return deepened(xray_8bit.pixels, 16)
