"""The coarse correction: a low-resolution map of what the network left, added back smoothly.

At the lowest rates a tile keeps one or two network iterations, and what they leave is largely
low-frequency: against JPEG 2000 at 0.125 bpp the network loses most of its MS-SSIM at the
coarse scales (1/4 to 1/16 resolution), where JPEG 2000's low-pass band costs almost nothing.
The network spends 32 bits per 16x16 block per iteration whatever the block holds, so a further
iteration is a poor buy for a slow shading error. The correction codes it directly: the mean
error over each ``f x f`` block, quantized with a step ``q``, coded by the residual layer's
coder (:mod:`codec.residual`, interpolative, integer tables), and added back by bilinear
interpolation between block centres. On two val images after one iteration of
rnnconv-pool-v9, ``f = 8, q = 2`` bought +4.0 and +2.4 dB and +0.013 and +0.015 MS-SSIM for
0.029 and 0.035 bpp (docs/codec.md, "Stop 13"); rate control (:mod:`codec.near_lossless`)
buys it per tile only where it removes more squared error per byte than the alternatives.

Everything the decoder does is integer arithmetic, so every machine adds the same correction.

Segment layout:

    u8          log2 of the block side f (2, 3 or 4: 4x4, 8x8 or 16x16 blocks)
    LEB128      quantization step q (1 or more)
    rest        a residual coder 2 segment of the ``(ceil(h / f), ceil(w / f))`` indices
"""

from __future__ import annotations

import numpy as np

from codec.bitstream import leb128
from codec.entropy import EntropyCodingError, read_leb128
from codec.residual import MAX_INDEX, decode_residual, encode_residual

#: Block sides: 16 where bytes are scarcest, 8 over the network alone, 4 and 8 under layers.
FACTORS = (4, 8, 16)


def coarse_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """The index grid of a ``shape`` tile: one index per started ``factor`` block."""
    return -(-shape[0] // factor), -(-shape[1] // factor)


def block_means(error: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``error`` over each ``factor`` block (partial edge blocks over their pixels)."""
    height, width = error.shape
    rows, cols = coarse_shape(error.shape, factor)
    padded = np.zeros((rows * factor, cols * factor))
    padded[:height, :width] = error
    inside = np.zeros_like(padded)
    inside[:height, :width] = 1.0
    blocks = (rows, factor, cols, factor)
    return padded.reshape(blocks).sum(axis=(1, 3)) / inside.reshape(blocks).sum(axis=(1, 3))


def _upsample_axis(values: np.ndarray, factor: int, axis: int, length: int) -> np.ndarray:
    """Linear interpolation between block centres along ``axis``, scaled by ``2 factor``
    (integers: output ``i`` lies at ``(2i + 1 - factor) / (2 factor)`` block units)."""
    count = values.shape[axis]
    position = 2 * np.arange(length) + 1 - factor
    lower = np.floor_divide(position, 2 * factor)
    fraction = position - lower * 2 * factor  # 0 .. 2 factor - 1
    below = np.take(values, np.clip(lower, 0, count - 1), axis=axis)
    above = np.take(values, np.clip(lower + 1, 0, count - 1), axis=axis)
    shape = [1, 1]
    shape[axis] = length
    weight = fraction.reshape(shape)
    return below * (2 * factor - weight) + above * weight


def correction(indices: np.ndarray, factor: int, step: int, shape: tuple[int, int]) -> np.ndarray:
    """The ``shape`` pixels (int64) the decoder adds: ``indices * step`` interpolated
    bilinearly between block centres, rounded half up."""
    values = indices.astype(np.int64) * step
    rows = _upsample_axis(values, factor, 0, shape[0])
    both = _upsample_axis(rows, factor, 1, shape[1])
    scale = 4 * factor * factor
    return np.floor_divide(both + scale // 2, scale)


def quantize_means(error: np.ndarray, factor: int, step: int) -> np.ndarray:
    """The indices an encoder writes for ``error`` (original minus base pixels)."""
    indices = np.rint(block_means(error, factor) / step).astype(np.int64)
    return np.clip(indices, -MAX_INDEX, MAX_INDEX)


def apply_correction(base: np.ndarray, addition: np.ndarray, peak: int) -> np.ndarray:
    """``base`` plus the correction, clipped to the pixel range, in ``base``'s dtype."""
    return np.clip(base.astype(np.int64) + addition, 0, peak).astype(base.dtype)


def encode_coarse(indices: np.ndarray, factor: int, step: int) -> bytes:
    """A coarse segment of ``indices`` (from :func:`quantize_means`)."""
    if factor not in FACTORS:
        raise ValueError(f"block side must be one of {FACTORS}, got {factor}")
    if step < 1:
        raise ValueError(f"quantization step must be at least 1, got {step}")
    return bytes([factor.bit_length() - 1]) + leb128(step) + encode_residual(indices)


def segment_parameters(data: bytes) -> tuple[int, int, int]:
    """A coarse segment's block side, quantization step, and where its indices start."""
    if not data:
        raise EntropyCodingError("coarse segment is empty")
    if data[0] > 4 or (1 << data[0]) not in FACTORS:
        raise EntropyCodingError(f"coarse segment block side byte {data[0]} (known: 2, 3, 4)")
    step, length = read_leb128(data[1:], "coarse quantization step")
    if step < 1:
        raise EntropyCodingError("coarse segment has quantization step 0")
    return 1 << data[0], step, 1 + length


def decode_coarse(data: bytes, shape: tuple[int, int], peak: int) -> np.ndarray:
    """The correction (int64, ``shape``) a coarse segment adds to a tile of ``shape``."""
    factor, step, offset = segment_parameters(data)
    if step > peak:
        raise EntropyCodingError(f"coarse segment has quantization step {step} (1..{peak})")
    indices = decode_residual(data[offset:], coarse_shape(shape, factor))
    return correction(indices, factor, step, shape)
