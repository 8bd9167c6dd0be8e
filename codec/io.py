"""Pixel arrays and PNG files, under the pixel contract of DESIGN.md.

A grayscale image is a 2-D ``uint8`` or ``uint16`` array plus ``bits_stored`` (8..16).
RGB/RGBA files whose colour channels are equal are accepted as gray (several NIH files are
stored that way); real colour is refused rather than silently averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np


class ImageError(ValueError):
    """An input image that Radiarc cannot archive; the message names the file and the reason."""

    def __init__(self, source: str | Path, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = str(source)
        self.reason = reason


@dataclass(frozen=True)
class GrayImage:
    """A 2-D grayscale image whose values use the low ``bits_stored`` bits."""

    pixels: np.ndarray
    bits_stored: int

    def __post_init__(self) -> None:
        validate_pixels(self.pixels, self.bits_stored)

    @property
    def peak(self) -> int:
        return peak_value(self.bits_stored)


def peak_value(bits_stored: int) -> int:
    """The PSNR peak, ``2**bits_stored - 1``."""
    return (1 << bits_stored) - 1


def validate_pixels(pixels: np.ndarray, bits_stored: int) -> None:
    """Raise ``ValueError`` unless ``pixels`` meets the pixel contract for ``bits_stored``."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 8..16, got {bits_stored}")
    if bits_stored > 8 * pixels.dtype.itemsize:
        raise ValueError(f"bits_stored {bits_stored} does not fit in {pixels.dtype}")
    if pixels.size and int(pixels.max()) > peak_value(bits_stored):
        raise ValueError(f"pixel value {int(pixels.max())} exceeds {bits_stored} bits")


def to_gray(array: np.ndarray, source: str | Path) -> np.ndarray:
    """One channel from gray, gray+alpha, or RGB(A) with equal channels; colour is an error."""
    if array.ndim == 2:
        return array
    if array.ndim != 3 or array.shape[2] not in (2, 3, 4):
        raise ImageError(source, f"unsupported image shape {array.shape}")
    channels = array.shape[2]
    if channels == 2:  # gray + alpha
        return np.ascontiguousarray(array[:, :, 0])
    red, green, blue = array[:, :, 0], array[:, :, 1], array[:, :, 2]
    if not (np.array_equal(red, green) and np.array_equal(red, blue)):
        raise ImageError(source, "colour image (channels differ); only grayscale is archived")
    return np.ascontiguousarray(red)


def bits_for(pixels: np.ndarray) -> int:
    """Bits stored implied by a PNG's container: 8 for uint8; the smallest that fits for uint16."""
    if pixels.dtype == np.uint8:
        return 8
    top = int(pixels.max()) if pixels.size else 0
    return max(8, top.bit_length())


def read_png(path: str | Path, bits_stored: int | None = None) -> GrayImage:
    """Read an 8- or 16-bit PNG as a :class:`GrayImage`.

    A 16-bit PNG does not record how many bits are significant; unless ``bits_stored`` is
    given, the smallest depth that holds the maximum value is used (at least 8).
    """
    try:
        array = imagecodecs.png_decode(Path(path).read_bytes())
    except OSError as error:
        raise ImageError(path, f"cannot read file ({error.strerror or error})") from error
    except Exception as error:  # imagecodecs raises its own PngError on corrupt data
        raise ImageError(path, f"not a readable PNG ({error})") from error
    gray = to_gray(array, path)
    if gray.dtype not in (np.uint8, np.uint16):
        raise ImageError(path, f"unsupported sample type {gray.dtype}")
    bits = bits_stored if bits_stored is not None else bits_for(gray)
    try:
        return GrayImage(gray, bits)
    except ValueError as error:
        raise ImageError(path, str(error)) from error


def write_png(path: str | Path, image: GrayImage) -> None:
    """Write an 8-bit PNG for 8-bit images, a 16-bit PNG otherwise (values unscaled)."""
    pixels = image.pixels
    if image.bits_stored > 8 and pixels.dtype != np.uint16:
        pixels = pixels.astype(np.uint16)
    Path(path).write_bytes(imagecodecs.png_encode(pixels))
