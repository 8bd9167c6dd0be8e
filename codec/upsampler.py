"""Fitted 2x upsampling of half-resolution tiles: one linear filter per iteration count.

Bicubic interpolation assumes the half-size grid holds point samples of a smooth image. It
holds neither: the encoder codes 2x2 means (:func:`codec.resolution.halve`), and the network's
reconstruction of them carries its own, iteration-dependent errors. A filter fitted by least
squares to map decoded half tiles back to the full-resolution originals undoes both as far as a
linear map can. It is fitted at export (:mod:`codec.export`), on the shipped network's own
reconstructions of training tiles, and shipped in the weights file; models without one
upsample bicubically, so their streams decode as before.

Measured (stop 18, docs/codec.md): v12's filter on 52 halved val tiles +0.15 to +0.25 dB over
bicubic after iterations 1-4; on whole images, where rate control picks half tiles only for
some tiles and mostly at 0.125 bpp, +0.13 dB and +0.0006 MS-SSIM at 0.125 bpp with the network
alone (``MODEL+half``), +0.04 dB with the residual layer, nothing at 0.25 and 0.5 bpp.

Each full-resolution pixel is one of four phases (its row and column parity); each phase has
its own ``TAPS x TAPS`` kernel over the half grid plus a bias. The filter is applied by
accumulating shifted copies in a fixed order in float32, so a tile's pixels are the same
whatever the batch, the thread count or the machine (rate control's measured errors and the
coarse corrections on half tiles need the decoder's pixels exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAPS = 6  # kernel support in half-grid pixels (probed: 8 adds under 0.03 dB)
LEAD = TAPS // 2 - 1  # half pixels before the one an output pixel lies in
LAG = TAPS - LEAD - 1
PHASES = 4  # (row parity, column parity): phase = 2 * row parity + column parity
FEATURES = TAPS * TAPS + 1  # the kernel's taps and a bias


@dataclass(frozen=True)
class Upsampler:
    """``kernels[k]`` serves tiles decoded to ``k + 1`` iterations (the last one beyond)."""

    kernels: np.ndarray  # (iterations, PHASES, TAPS, TAPS) float32
    biases: np.ndarray  # (iterations, PHASES) float32

    def __post_init__(self) -> None:
        iterations = self.kernels.shape[0]
        if self.kernels.shape != (iterations, PHASES, TAPS, TAPS) or iterations == 0:
            raise ValueError(f"upsampler kernels of shape {self.kernels.shape}")
        if self.biases.shape != (iterations, PHASES):
            raise ValueError(f"upsampler biases of shape {self.biases.shape}")

    def double(self, half: np.ndarray, iterations: int) -> np.ndarray:
        """``(h, w)`` normalised pixels decoded with ``iterations`` to ``(2h, 2w)``."""
        if iterations < 1:
            raise ValueError(f"a half tile decoded with {iterations} iterations")
        index = min(iterations, len(self.kernels)) - 1
        height, width = half.shape
        padded = np.pad(half.astype(np.float32), ((LEAD, LAG), (LEAD, LAG)), "edge")
        out = np.empty((height, 2, width, 2), np.float32)
        for phase in range(PHASES):
            kernel = self.kernels[index, phase]
            total = np.full((height, width), self.biases[index, phase], np.float32)
            for row in range(TAPS):
                for col in range(TAPS):
                    total += kernel[row, col] * padded[row : row + height, col : col + width]
            out[:, phase // 2, :, phase % 2] = total
        return out.reshape(2 * height, 2 * width)


def features(half: np.ndarray) -> np.ndarray:
    """``(h * w, FEATURES)``: each half pixel's ``TAPS x TAPS`` neighbourhood and a 1."""
    height, width = half.shape
    padded = np.pad(half.astype(np.float64), ((LEAD, LAG), (LEAD, LAG)), "edge")
    columns = [
        padded[row : row + height, col : col + width].ravel()
        for row in range(TAPS)
        for col in range(TAPS)
    ]
    return np.stack([*columns, np.ones(height * width)], axis=1)


def phase_targets(full: np.ndarray) -> np.ndarray:
    """``(h * w, PHASES)``: the four full-resolution pixels of each half pixel."""
    height, width = full.shape
    if height % 2 or width % 2:
        raise ValueError(f"a full-resolution tile of {height}x{width} pixels: sides must be even")
    blocks = full.reshape(height // 2, 2, width // 2, 2).transpose(0, 2, 1, 3)
    return blocks.reshape(-1, PHASES).astype(np.float64)


class UpsamplerFit:
    """Least squares over many tiles without holding them: the normal equations, summed."""

    def __init__(self, iterations: int) -> None:
        self.gram = np.zeros((iterations, FEATURES, FEATURES))
        self.cross = np.zeros((iterations, FEATURES, PHASES))

    def add(self, decoded: list[np.ndarray], full: np.ndarray) -> None:
        """One tile: its half-size reconstruction after each iteration, and its original
        (both normalised, the original ``2h x 2w``)."""
        targets = phase_targets(full)
        for k, half in enumerate(decoded[: len(self.gram)]):
            x = features(half)
            self.gram[k] += x.T @ x
            self.cross[k] += x.T @ targets

    def solve(self) -> Upsampler:
        if not self.gram[:, -1, -1].all():
            raise ValueError("no tiles were added for some iteration: nothing to fit")
        # A whisper of ridge keeps flat-only training sets (padding, black borders) solvable.
        ridge = 1e-9 * np.trace(self.gram, axis1=1, axis2=2)[:, None, None] * np.eye(FEATURES)
        weights = np.linalg.solve(self.gram + ridge, self.cross)  # (iterations, FEATURES, 4)
        kernels = weights[:, :-1, :].transpose(0, 2, 1).reshape(-1, PHASES, TAPS, TAPS)
        return Upsampler(kernels.astype(np.float32), weights[:, -1, :].astype(np.float32))
