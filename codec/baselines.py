"""Classical codecs behind one rate-distortion interface, the anchors the learned codec must beat.

Every codec is configured for the image's true bit depth (``bits_stored``): a 12-bit image
declared as 16-bit wastes bits on empty bit planes and mis-tunes the encoder, and an anchor
handicapped that way flatters whatever is compared with it. Where a format cannot record the
true depth the codec says so: lossy JPEG has only 8- and 12-bit modes (9..12-bit images go in
12-bit frames, deeper ones are refused), and imagecodecs' JPEG-LS always writes 16-bit frames
for ``uint16`` data, so JPEG-LS takes only 8- and 16-bit images.

Streams are bare codestreams (J2K, not JP2; JPEG XL without container) so that bpp counts
pixels, not file-format boxes. Encoders run on one thread so timings compare like with like.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import imagecodecs
import numpy as np

from codec.io import GrayImage, peak_value

__all__ = [
    "BASELINES",
    "HTJ2K",
    "JPEG",
    "JPEG2000",
    "JPEGLS",
    "JPEGXL",
    "CodecUnsupported",
    "RateDistortionCodec",
    "RateUnreachable",
]


class CodecUnsupported(ValueError):
    """This codec cannot take this image (or has no such mode); the message says why."""


class RateUnreachable(ValueError):
    """Even the codec's lowest-rate setting does not fit the target bpp."""

    def __init__(self, codec: str, target_bpp: float, lowest_bpp: float, parameter: float):
        super().__init__(
            f"{codec} cannot go down to {target_bpp:g} bpp: its lowest rate is "
            f"{lowest_bpp:.4f} bpp (parameter {parameter:g})"
        )
        self.lowest_bpp = lowest_bpp
        self.parameter = parameter


class RateDistortionCodec(ABC):
    """A codec with one scalar rate parameter, searchable for a target bit rate.

    ``parameter_range`` bounds the search; ``rate_rises_with_parameter`` says which end is
    cheap; integer parameters are searched exactly, continuous ones by bisection (in log space
    when ``log_parameter``) until the stream is within ``tolerance`` of the budget or the
    bracket is narrower than ``parameter_resolution`` (rate is a staircase in the parameter:
    a small image has few truncation points, and the budget may fall on a step).
    """

    name: ClassVar[str]
    parameter_range: ClassVar[tuple[float, float]]
    rate_rises_with_parameter: ClassVar[bool] = True
    integer_parameter: ClassVar[bool] = False
    log_parameter: ClassVar[bool] = False
    parameter_resolution: ClassVar[float] = 1e-4  # in the search space (log when log_parameter)

    def check(self, image: GrayImage) -> None:
        """Raise :class:`CodecUnsupported` if this codec cannot code ``image`` faithfully."""
        return None

    def parameter_bounds(self, image: GrayImage) -> tuple[float, float]:
        return self.parameter_range

    @abstractmethod
    def encode(self, image: GrayImage, parameter: float) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray: ...

    def encode_lossless(self, image: GrayImage) -> bytes:
        raise CodecUnsupported(f"{self.name} has no lossless mode")

    def encode_seconds(self, image: GrayImage, target_bpp: float, parameter: float) -> float:
        """Seconds one encode of ``image`` at the setting :meth:`encode_at_bpp` found takes,
        as a user who knows the setting would run it (the search is not counted)."""
        del target_bpp
        started = time.perf_counter()
        self.encode(image, parameter)
        return time.perf_counter() - started

    def encode_at_bpp(
        self, image: GrayImage, target_bpp: float, *, tolerance: float = 0.01
    ) -> tuple[bytes, float]:
        """The largest stream whose real size is at most ``target_bpp``, and its parameter."""
        if target_bpp <= 0:
            raise ValueError(f"target bpp must be positive, got {target_bpp}")
        self.check(image)
        budget = math.floor(target_bpp * image.pixels.size / 8)
        best: tuple[bytes, float] | None = None

        def size_at(parameter: float) -> int:
            nonlocal best
            data = self.encode(image, parameter)
            if len(data) <= budget and (best is None or len(data) > len(best[0])):
                best = (data, parameter)
            return len(data)

        low, high = self.parameter_bounds(image)
        cheap, rich = (low, high) if self.rate_rises_with_parameter else (high, low)
        lowest = size_at(cheap)
        if lowest > budget:
            raise RateUnreachable(self.name, target_bpp, lowest * 8 / image.pixels.size, cheap)
        if size_at(rich) > budget:
            if self.integer_parameter:
                _bisect_integer(size_at, budget, int(cheap), int(rich))
            else:
                _bisect_float(
                    size_at,
                    budget,
                    (cheap, rich),
                    log=self.log_parameter,
                    tolerance=tolerance,
                    resolution=self.parameter_resolution,
                )
        assert best is not None  # the cheap end fitted
        return best


def _bisect_integer(size_at: Callable[[float], int], budget: int, fits: int, over: int) -> None:
    while abs(over - fits) > 1:
        middle = (fits + over) // 2
        if size_at(middle) <= budget:
            fits = middle
        else:
            over = middle


def _bisect_float(
    size_at: Callable[[float], int],
    budget: int,
    bracket: tuple[float, float],
    *,
    log: bool,
    tolerance: float,
    resolution: float,
) -> None:
    """Bisect between a parameter whose stream fits and one whose stream does not."""
    to_x: Callable[[float], float] = math.log if log else float
    from_x: Callable[[float], float] = math.exp if log else float
    x_fits, x_over = to_x(bracket[0]), to_x(bracket[1])
    while abs(x_over - x_fits) > resolution:
        x_middle = (x_fits + x_over) / 2
        size = size_at(from_x(x_middle))
        if size <= budget:
            x_fits = x_middle
            if size >= (1 - tolerance) * budget:
                return
        else:
            x_over = x_middle


def _native(image: GrayImage) -> np.ndarray:
    """``uint8`` for 8-bit images, ``uint16`` otherwise, C-contiguous."""
    dtype = np.uint8 if image.bits_stored <= 8 else np.uint16
    return np.ascontiguousarray(image.pixels, dtype=dtype)


def _fit(decoded: np.ndarray, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
    """Decoder output as the pixel contract wants it: the shape, the dtype, at most the peak."""
    if decoded.shape != tuple(shape):
        raise ValueError(f"decoded shape {decoded.shape} differs from {tuple(shape)}")
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    return np.clip(decoded, 0, peak_value(bits_stored)).astype(dtype)


class JPEG2000(RateDistortionCodec):
    """OpenJPEG, irreversible 9/7 for lossy and reversible 5/3 for lossless.

    imagecodecs' ``level`` is the PSNR (dB) that OpenJPEG's fixed-quality rate allocator aims
    at, a continuous knob, so bisection on it lands within a fraction of a percent of a bpp.
    """

    name = "jpeg2000"
    parameter_range = (5.0, 140.0)
    parameter_resolution = 1e-3  # dB

    def _encode(self, image: GrayImage, level: float | None, reversible: bool) -> bytes:
        return bytes(
            imagecodecs.jpeg2k_encode(
                _native(image),
                level=level,  # type: ignore[arg-type]  # float PSNR works; the stub says int
                codecformat="J2K",
                reversible=reversible,
                bitspersample=image.bits_stored,
                numthreads=1,
            )
        )

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        return self._encode(image, parameter, reversible=False)

    def encode_lossless(self, image: GrayImage) -> bytes:
        return self._encode(image, None, reversible=True)

    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
        return _fit(imagecodecs.jpeg2k_decode(data, numthreads=1), shape, bits_stored)


def _set_j2k_precision(codestream: bytes, bits_stored: int) -> bytes:
    """Rewrite the one-component SIZ marker's Ssiz byte to unsigned ``bits_stored``."""
    if codestream[:4] != b"\xff\x4f\xff\x51" or codestream[40:42] != b"\x00\x01":
        raise ValueError("not a one-component J2K codestream")
    patched = bytearray(codestream)
    patched[42] = bits_stored - 1
    return bytes(patched)


class HTJ2K(RateDistortionCodec):
    """High-throughput JPEG 2000 (OpenJPH); the parameter is the quantization step.

    OpenJPH, as imagecodecs binds it, takes the bit depth from the dtype (8 or 16). For 9..15
    bits the stream is made as if for ``bits_stored``: lossy, the samples are shifted up to 16
    bits (irreversible coding works on samples normalised by the depth, so the codestream is
    that of a ``bits_stored`` encode except for the SIZ depth, which is then rewritten; for
    8-bit data this gives byte-identical streams); lossless, the level-shifted samples are
    coded as signed 16-bit and SIZ is rewritten to unsigned ``bits_stored``.

    Streams are decoded by OpenJPEG's HT decoder: imagecodecs' OpenJPH decoder (0.26) wraps
    reconstructions outside the sample range instead of clipping them (a 255.6 in an 8-bit
    image comes back as 0), which costs whole decibels on X-rays with saturated regions.
    """

    name = "htj2k"
    parameter_range = (1e-5, 1.0)  # a fraction of the full range 2**bits_stored
    rate_rises_with_parameter = False
    log_parameter = True

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        bits = image.bits_stored
        if bits in (8, 16):
            return bytes(imagecodecs.htj2k_encode(_native(image), parameter, reversible=False))
        shifted = np.left_shift(_native(image), 16 - bits)
        stream = imagecodecs.htj2k_encode(shifted, parameter, reversible=False)
        return _set_j2k_precision(bytes(stream), bits)

    def encode_lossless(self, image: GrayImage) -> bytes:
        bits = image.bits_stored
        if bits in (8, 16):
            return bytes(imagecodecs.htj2k_encode(_native(image), reversible=True))
        centred = (image.pixels.astype(np.int32) - (1 << (bits - 1))).astype(np.int16)
        stream = imagecodecs.htj2k_encode(centred, reversible=True)
        return _set_j2k_precision(bytes(stream), bits)

    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
        return _fit(imagecodecs.jpeg2k_decode(data, numthreads=1), shape, bits_stored)


class JPEGXL(RateDistortionCodec):
    """libjxl at its default effort; the parameter is the Butteraugli distance (0.01..25)."""

    name = "jpegxl"
    parameter_range = (0.01, 25.0)
    rate_rises_with_parameter = False
    log_parameter = True

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        return bytes(
            imagecodecs.jpegxl_encode(
                _native(image), distance=parameter, bitspersample=image.bits_stored, numthreads=1
            )
        )

    def encode_lossless(self, image: GrayImage) -> bytes:
        return bytes(
            imagecodecs.jpegxl_encode(
                _native(image), lossless=True, bitspersample=image.bits_stored, numthreads=1
            )
        )

    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
        return _fit(imagecodecs.jpegxl_decode(data, numthreads=1), shape, bits_stored)


class JPEG(RateDistortionCodec):
    """libjpeg-turbo with optimised Huffman tables; the parameter is the quality (1..100).

    Lossy JPEG has 8- and 12-bit frames only; lossless JPEG (process 14, predictor 1, as in
    DICOM) records any depth from 8 to 16 bits.
    """

    name = "jpeg"
    parameter_range = (1, 100)
    integer_parameter = True

    def check(self, image: GrayImage) -> None:
        if image.bits_stored > 12:
            raise CodecUnsupported(
                f"lossy JPEG has 8- and 12-bit modes only; a {image.bits_stored}-bit image "
                "would lose its low bits before coding"
            )

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        self.check(image)
        frame_bits = 8 if image.bits_stored <= 8 else 12
        return bytes(
            imagecodecs.jpeg8_encode(
                _native(image), level=int(parameter), optimize=True, bitspersample=frame_bits
            )
        )

    def encode_lossless(self, image: GrayImage) -> bytes:
        return bytes(
            imagecodecs.jpeg8_encode(
                _native(image), lossless=True, predictor=1, bitspersample=image.bits_stored
            )
        )

    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
        return _fit(imagecodecs.jpeg8_decode(data), shape, bits_stored)


class JPEGLS(RateDistortionCodec):
    """CharLS; the parameter is NEAR, the largest error allowed per pixel (0 = lossless)."""

    name = "jpegls"
    parameter_range = (1, 255)
    rate_rises_with_parameter = False
    integer_parameter = True

    def check(self, image: GrayImage) -> None:
        if image.bits_stored not in (8, 16):
            raise CodecUnsupported(
                f"imagecodecs' JPEG-LS writes 16-bit frames for any uint16 data, so a "
                f"{image.bits_stored}-bit image would be coded with the wrong depth"
            )

    def parameter_bounds(self, image: GrayImage) -> tuple[float, float]:
        return (1, min(255, image.peak // 2))

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        self.check(image)
        return bytes(imagecodecs.jpegls_encode(_native(image), level=int(parameter)))

    def encode_lossless(self, image: GrayImage) -> bytes:
        self.check(image)
        return bytes(imagecodecs.jpegls_encode(_native(image), level=0))

    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
        return _fit(imagecodecs.jpegls_decode(data), shape, bits_stored)


BASELINES: dict[str, type[RateDistortionCodec]] = {
    codec.name: codec for codec in (JPEG2000, HTJ2K, JPEGXL, JPEG, JPEGLS)
}
