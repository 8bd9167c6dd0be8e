"""The residual layer: what the network left, coded so that no pixel is off by more than D.

After a tile's network iterations the decoder holds pixels ``base``; the original differs by
``r = x - base``. The layer quantizes ``r`` with a step of ``2D + 1`` centred on zero (the
near-lossless rule of JPEG-LS): index ``e = sign(r) * floor((|r| + D) / (2D + 1))``, pixels
``clip(base + e * (2D + 1))``, so every pixel is within ``D`` of the original, and ``D = 0`` is
lossless. This is how the codec reaches the 2-4 bpp and lossless rates a 10-iteration network
cannot: the network predicts, the layer codes what it leaves (with no iterations, the base is
mid-grey and the layer codes the tile itself; codec/near_lossless.py chooses).

Indices are coded per tile by hierarchical interpolation, because what the network leaves is
spatially correlated (neighbouring residuals correlate 0.7-0.9 on chest radiographs): first
every 16th row and column, then, halving the spacing each round, the centres of the squares
already known and then the midpoints of their sides, each predicted from the four known
neighbours around it; the encoder scales the predictions by 0/4 to 4/4 per tile, whichever
suits it (noise without structure is best not predicted). Each step is one vectorised pass,
and each index is coded as its difference ``d`` from the prediction: the magnitude class (bit
length of ``|d|``: 0 for 0, 1 for 1, 2 for 2-3, ...) range-coded under a context, then its
sign and the bits below its leading one. Every table is integers summing to 65536, fitted on
the tile by the encoder and written in the segment, so decoding needs no model, only integer
arithmetic, and is exact on any machine.

Two coders, one per stream format (docs/bitstream.md):

- **Coder 1** (format 4): predictions are the mean of the four neighbours; 17 contexts, the
  coarse grid and then 1 + the bit length of the neighbours' spread (max - min); signs and
  low bits raw.
- **Coder 2** (format 5, what encoders write): along each of the two lines through the
  position (the diagonals for centres, the row and column for sides) a cubic interpolation
  ``(9 (a + b) - (a3 + b3)) / 16`` of the neighbours at one and three half-spacings (linear
  where the outer pair falls outside the tile), the two lines weighted by the inverse of
  their local gradient, so an edge is followed rather than blurred (or the mean, per tile);
  the coarse grid coded as differences from its left neighbour (the first column from the
  one above; per tile, where that pays); 129 contexts (or coder 1's 17, per tile), the coarse
  grid and then spread (16) x the bit length of the neighbours' own coded differences (4:
  error energy, after CALIC) x whether the step is one of the last two (2); and the bit just
  below the leading one, which is not uniform (small magnitudes are likelier within a
  class), range-coded under its class. Lossless, it codes 4-5% fewer bits than coder 1 on
  the 8-bit chest X-rays of tests/data, 3% on the 10-bit DICOMs and 0.7% on a 15-bit one
  (docs/codec.md, stop 12); near-lossless over a network base, the same or up to 2% fewer.

Segment layout:

    u8                 prediction weight w: predictions are w/4 of the interpolation; coder 2
                       adds 0x10 when the tile uses coder 1's 17 contexts instead of the 129
                       (its encoder picks the set with fewer estimated bits, tables included)
                       and 0x20 when it predicts by the neighbours' mean, not the cubic, and
                       0x40 when its coarse grid is coded as differences (each chosen by the
                       encoder, whichever costs fewer estimated bits); 0x80 when the decoder
                       smooths the dequantized residual (:func:`reconstruct`; bound 2D)
    per context        u8 class count n, then n LEB128 frequencies (n = 0: context unused)
    coder 2: u8 n      then n LEB128 frequencies (of 65536) of a 0 as the bit below the
                       leading one, for classes 2 .. n + 1 (the largest class in the tile)
    LEB128             byte length of the range-coded part
    range-coded        step by step: the classes, context by context, in the step's
                       row-major order; coder 2, then the bits below the leading ones, class
                       by class
    raw bits           step by step: signs of the nonzero differences (1: negative), then the
                       bits below each leading one (coder 2: below the range-coded one), most
                       significant first; zero-padded to a byte
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import constriction
import numpy as np

from codec.bitstream import leb128
from codec.entropy import EntropyCodingError, bytes_to_words, read_leb128, words_to_bytes

FREQUENCY_SCALE = 1 << 16
MAX_INDEX = (1 << 16) - 1  # the largest residual of 16-bit pixels
CLASSES = 18  # bit lengths 0..17 of a difference from a prediction, |d| <= 2 * MAX_INDEX
TOP_STRIDE = 16  # the coarse grid's spacing: a power of two
WEIGHTS = 5  # predictions are 0/4 .. 4/4 of the interpolation, chosen per tile
CODERS = (1, 2)  # coder 1 in format 4 streams, coder 2 in format 5
LATEST_CODER = 2
SPREADS = 16  # bit lengths 0..15 of the neighbours' spread (longer ones share the last)
ENERGIES = 4  # coder 2: bit lengths 0..3 of the neighbours' mean |d| (longer share the last)
#: The coarse grid's context, then coder 1: per spread; coder 2: per spread, energy, fineness.
CONTEXTS = {1: 1 + SPREADS, 2: 1 + SPREADS * ENERGIES * 2}
TOP_CLASSES = range(2, CLASSES)  # coder 2: classes with a bit below the leading one
#: Coder 2, in the segment's first byte beside the weight: the tile uses coder 1's 17 contexts
#: (spread alone). Near-lossless layers over a network base are nearly all 0s and 1s, where
#: 129 tables cost more than they tell.
SPREAD_ONLY = 0x10
#: Coder 2, in the same byte: the tile is predicted by the neighbours' mean, not the cubic
#: (its encoder's choice, like the weight: on noise the mean is the steadier guess).
MEAN_PREDICTION = 0x20
#: Coder 2, in the same byte: the coarse grid is coded as differences between neighbours
#: (smooth images), not as values (a network's residual, near zero and uncorrelated).
GRID_DIFFERENCES = 0x40
#: Coder 2, in the same byte: the decoder smooths the dequantized residual within its bins
#: (:func:`reconstruct`), so the tile's pixels are within 2D of the original, not D.
SMOOTHED = 0x80
BINOMIAL = (1, 4, 6, 4, 1)  # the smoothing's taps, per axis (sum 16)


def quantize(residual: np.ndarray, max_error: int) -> np.ndarray:
    """Indices whose reconstruction is within ``max_error`` of ``residual`` everywhere."""
    if max_error < 0:
        raise ValueError(f"max error must be at least 0, got {max_error}")
    magnitude = (np.abs(residual.astype(np.int64)) + max_error) // (2 * max_error + 1)
    return np.sign(residual).astype(np.int64) * magnitude


def reconstruct(
    base: np.ndarray, indices: np.ndarray, max_error: int, peak: int, smooth: bool = False
) -> np.ndarray:
    """``base`` corrected by the layer, in ``base``'s dtype (clipping only moves a pixel
    closer to the original, which lies in ``[0, peak]``).

    With ``smooth``, the dequantized residual ``r = e (2D + 1)`` is first replaced by its 5x5
    binomial average (integers, rounded half up, edges replicated) clipped into its own bin
    ``[r - D, r + D]``: where a coarse layer is mostly zeros, its isolated steps of ``2D + 1``
    become gradual (the staircase that costs SSIM), and every pixel stays within ``2D`` of the
    original (the true residual lies in the same bin). A bpp target takes it per tile where
    it removes squared error (docs/codec.md, stop 12)."""
    residual = indices.astype(np.int64) * (2 * max_error + 1)
    if smooth:
        residual = np.clip(_binomial(residual), residual - max_error, residual + max_error)
    return np.clip(base.astype(np.int64) + residual, 0, peak).astype(base.dtype)


def _binomial(values: np.ndarray) -> np.ndarray:
    padded = np.pad(values, len(BINOMIAL) // 2, mode="edge")
    height, width = values.shape
    rows = np.zeros((padded.shape[0], width), dtype=np.int64)
    for i, tap in enumerate(BINOMIAL):
        rows += tap * padded[:, i : i + width]
    both = np.zeros((height, width), dtype=np.int64)
    for i, tap in enumerate(BINOMIAL):
        both += tap * rows[i : i + height]
    scale = sum(BINOMIAL) ** 2
    return (both + scale // 2) // scale


def smoothed(segment: bytes, coder: int) -> bool:
    """Whether a residual segment tells its decoder to smooth (:data:`SMOOTHED`)."""
    return coder == 2 and bool(segment) and bool(segment[0] & SMOOTHED)


def layer_bound(segment: bytes, max_error: int, coder: int) -> int:
    """The largest pixel error a layer with this segment and ``max_error`` allows."""
    return 2 * max_error if smoothed(segment, coder) else max_error


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2**53: frexp's exponent, which is exact (a
    power-of-two split of a float that holds the integer exactly; no logarithm, no rounding)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _check_coder(coder: int) -> None:
    if coder not in CODERS:
        raise ValueError(f"unknown residual coder {coder} (known: {CODERS})")


@dataclass(frozen=True)
class _Step:
    """Positions coded together, and the neighbours (already decoded) that predict them."""

    positions: np.ndarray  # flat indices into the tile, row-major
    #: (4, n) flat indices of each position's neighbours; one outside the tile is replaced by
    #: one inside (for the spread), and ``valid`` zeroes it in the sum. Positions last, so
    #: that reductions over neighbours are elementwise operations on rows.
    neighbours: np.ndarray
    valid: np.ndarray  # (4, n) int64, 1 inside the tile and 0 outside
    count: np.ndarray  # (n,) neighbours inside the tile (at least 1 when there are any)
    #: (2, 4, n) flat indices of the values at -3, -1, +1, +3 half-spacings along the two
    #: lines through each position (coder 2's interpolation), and which are inside the tile.
    lines: np.ndarray
    lines_inside: np.ndarray
    fine: bool  # one of the last two steps (spacing 1): coder 2 gives them their own contexts


def _grid(
    shape: tuple[int, int], start: tuple[int, int], stride: int
) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(
        np.arange(start[0], shape[0], stride), np.arange(start[1], shape[1], stride), indexing="ij"
    )
    return rows.ravel(), cols.ravel()


def _at(
    shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of ``(rows, cols) + offsets`` (offsets ``(..., 2)``; outside: clipped into
    the tile) and which lie inside."""
    near_rows = rows.reshape((-1,) + (1,) * (offsets.ndim - 1)) + offsets[..., 0]
    near_cols = cols.reshape((-1,) + (1,) * (offsets.ndim - 1)) + offsets[..., 1]
    inside = (near_rows >= 0) & (near_rows < shape[0]) & (near_cols >= 0) & (near_cols < shape[1])
    clipped = np.clip(near_rows, 0, shape[0] - 1) * shape[1] + np.clip(near_cols, 0, shape[1] - 1)
    return clipped, inside


def _step(
    shape: tuple[int, int],
    rows: np.ndarray,
    cols: np.ndarray,
    half: int,
    directions: list[tuple[int, int]],
    fine: bool,
) -> _Step:
    """A step whose positions are predicted along ``directions`` (two lines; none on the
    coarse grid) from neighbours ``half`` apart."""
    order = np.argsort(rows * shape[1] + cols, kind="stable")  # row-major
    rows, cols = rows[order], cols[order]
    # Each line's -3, -1, +1, +3 half-spacings; the four neighbours are the inner pairs.
    multiples = (-3, -1, 1, 3)
    lines = np.array([[(m * half * dr, m * half * dc) for m in multiples] for dr, dc in directions])
    lines = lines.reshape(len(directions), 4, 2)
    line_index, line_inside = (
        np.ascontiguousarray(array.transpose(1, 2, 0)) for array in _at(shape, rows, cols, lines)
    )
    neighbours = line_index[:, 1:3].reshape(2 * len(directions), rows.size)
    valid = line_inside[:, 1:3].reshape(2 * len(directions), rows.size)
    if directions:  # every position has a neighbour inside; the first stands in for the others
        inside = neighbours[valid.argmax(axis=0), np.arange(rows.size)]
        neighbours = np.where(valid, neighbours, inside[np.newaxis])
    count = valid.sum(axis=0)
    return _Step(
        rows * shape[1] + cols,
        neighbours,
        valid.astype(np.int64),
        count,
        line_index,
        line_inside,
        fine,
    )


@functools.lru_cache(maxsize=8)
def _steps(shape: tuple[int, int]) -> list[_Step]:
    """Every position once: the coarse grid, then per halving its centres and side midpoints."""
    steps = [_step(shape, *_grid(shape, (0, 0), TOP_STRIDE), TOP_STRIDE, [], False)]
    stride = TOP_STRIDE
    while stride > 1:
        half = stride // 2
        fine = half == 1
        diagonals = [(1, 1), (1, -1)]  # through the corners of the square a centre sits in
        steps.append(_step(shape, *_grid(shape, (half, half), stride), half, diagonals, fine))
        across, down = _grid(shape, (0, half), stride), _grid(shape, (half, 0), stride)
        rows, cols = np.concatenate([across[0], down[0]]), np.concatenate([across[1], down[1]])
        steps.append(_step(shape, rows, cols, half, [(1, 0), (0, 1)], fine))
        stride = half
    return steps


def _mean_prediction(flat: np.ndarray, step: _Step) -> tuple[np.ndarray, np.ndarray]:
    """Coder 1's interpolation as numerator and denominator: the neighbours' mean."""
    return (flat[step.neighbours] * step.valid).sum(axis=0), step.count


def _cubic_prediction(flat: np.ndarray, step: _Step) -> tuple[np.ndarray, np.ndarray]:
    """Coder 2's interpolation as numerator and denominator: per line, cubic (linear where
    the outer pair is outside), the lines weighted by the inverse of 2 + their gradient (in
    halves of a level); the neighbours' mean where neither line has both inner values."""
    values, inside = flat[step.lines], step.lines_inside  # (2 lines, 4 places, n)
    a3, a, b, b3 = (values[:, i] for i in range(4))
    usable = inside[:, 1] & inside[:, 2]
    full = usable & inside[:, 0] & inside[:, 3]
    estimate = np.where(full, 9 * (a + b) - (a3 + b3), 8 * (a + b))  # sixteenths
    gradient = 2 * np.abs(a - b) + np.where(full, np.abs(a3 - a) + np.abs(b3 - b), 0)
    # Weight of each line: 2 + the other line's gradient, or 1 when the other is unusable.
    other_usable, other_gradient = usable[::-1], gradient[::-1]
    weights = usable * np.where(other_usable, 2 + other_gradient, 1)
    numerator = (weights * estimate).sum(axis=0)
    denominator = 16 * weights.sum(axis=0)
    total, count = _mean_prediction(flat, step)
    neither = denominator == 0
    return np.where(neither, total, numerator), np.where(neither, count, denominator)


@dataclass(frozen=True)
class _Interpolation:
    """A step's interpolation as an integer fraction per position (denominator 0: none, on
    the coarse grid)."""

    numerator: np.ndarray
    denominator: np.ndarray

    def prediction(self, weight: int) -> np.ndarray:
        """``weight`` quarters of the interpolation, rounded half up, within the range of
        indices (a cubic overshoots at steep edges); 0 on the coarse grid. Integer
        arithmetic, so every machine predicts the same."""
        if not self.denominator.any():
            return np.zeros(self.denominator.size, dtype=np.int64)
        numerator, denominator = self.numerator, self.denominator
        prediction = (2 * weight * numerator + 4 * denominator) // (8 * denominator)
        return np.clip(prediction, -MAX_INDEX, MAX_INDEX)


def _interpolation(flat: np.ndarray, step: _Step, cubic: bool) -> _Interpolation:
    if not step.count.any():
        zeros = np.zeros(step.positions.size, dtype=np.int64)
        return _Interpolation(zeros, zeros)
    interpolate = _cubic_prediction if cubic else _mean_prediction
    return _Interpolation(*interpolate(flat, step))


def estimated_bits(indices: np.ndarray) -> float:
    """About what :func:`encode_residual` spends on ``indices``, at a fraction of its time
    (coder 1's mean interpolation and 17 contexts, ideal tables, no range coder): enough to
    rank bases for the same tile (within 0.1% of always picking the truly smallest on a
    chest X-ray's near-lossless ladder, docs/codec.md stop 12)."""
    flat, steps = indices.astype(np.int64).ravel(), _steps(indices.shape)
    interpolations = [_interpolation(flat, step, cubic=False) for step in steps]
    # Coder 1's contexts read no magnitudes: any array of the right size stands in.
    contexts = np.concatenate([_contexts(flat, flat, step, 1) for step in steps])
    values = np.concatenate([flat[step.positions] for step in steps])

    def cost(weight: int) -> float:
        predictions = [interpolation.prediction(weight) for interpolation in interpolations]
        return _ideal_bits(values - np.concatenate(predictions), contexts)

    return min(cost(0), cost(WEIGHTS - 1))  # noise, structure


def _coarse_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // TOP_STRIDE), -(-shape[1] // TOP_STRIDE)


def _coarse_differences(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Coder 2 on the coarse grid (row-major ``values``): each value less its left neighbour,
    the first column less the one above (the grid is smooth: about a third fewer bits than
    the values themselves on chest X-rays)."""
    grid = values.reshape(_coarse_shape(shape))
    differences = np.diff(grid, axis=1, prepend=0)
    differences[:, 0] = np.diff(grid[:, 0], prepend=0)
    return differences.ravel()


def _coarse_values(differences: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`_coarse_differences`."""
    grid = differences.reshape(_coarse_shape(shape)).copy()
    grid[:, 0] = np.cumsum(grid[:, 0])
    return np.cumsum(grid, axis=1).ravel()


def _contexts(flat: np.ndarray, magnitudes: np.ndarray, step: _Step, coder: int) -> np.ndarray:
    """Each position's context (:data:`CONTEXTS`); ``magnitudes`` holds ``|d|`` of every
    position coded so far (coder 2's error energy)."""
    if not step.count.any():
        return np.zeros(step.positions.size, dtype=np.int64)
    values = flat[step.neighbours]
    spread = np.minimum(_bit_length(values.max(axis=0) - values.min(axis=0)), SPREADS - 1)
    if coder == 1:
        return 1 + spread
    energy = (magnitudes[step.neighbours] * step.valid).sum(axis=0) // step.count
    energy = np.minimum(_bit_length(energy), ENERGIES - 1)
    return 1 + (spread * ENERGIES + energy) * 2 + int(step.fine)


def _spread_only(contexts: np.ndarray) -> np.ndarray:
    """Coder 2's contexts merged over energy and fineness: coder 1's 17."""
    return np.where(contexts > 0, 1 + (contexts - 1) // (2 * ENERGIES), 0)


def _entropy_bits(counts: np.ndarray) -> float:
    """Bits an ideal coder spends on symbols with these per-context class counts."""
    totals = counts.sum(axis=1, keepdims=True)
    used = counts > 0
    return float(-(counts[used] * np.log2((counts / np.maximum(totals, 1))[used])).sum())


def _frequencies(counts: np.ndarray) -> np.ndarray:
    """Counts scaled to integers summing to 65536, every class that occurs at least 1."""
    frequencies = counts * FREQUENCY_SCALE // counts.sum()
    frequencies[(counts > 0) & (frequencies == 0)] = 1
    frequencies[np.argmax(frequencies)] += FREQUENCY_SCALE - frequencies.sum()
    return frequencies


def _model(frequencies: np.ndarray) -> constriction.stream.model.Categorical:
    # frequency / 65536 is exact in float64: every machine quantises the same probabilities.
    return constriction.stream.model.Categorical(
        frequencies.astype(np.float64) / FREQUENCY_SCALE, perfect=False
    )


def _coded(frequencies: np.ndarray) -> bool:
    """A context whose table holds one class needs no bits: every index there is that class."""
    return int(np.count_nonzero(frequencies)) > 1


def _zero_frequency(bits: np.ndarray) -> int:
    """Coder 2's table for one class's bits below the leading one: the frequency of a 0 of
    65536; 65536 (all zero, or none) and 0 (all one) cost no bits."""
    zeros = int(bits.size - np.count_nonzero(bits))
    if zeros == bits.size:
        return FREQUENCY_SCALE
    if not zeros:
        return 0
    return min(max(zeros * FREQUENCY_SCALE // bits.size, 1), FREQUENCY_SCALE - 1)


def _bit_model(zero_frequency: int) -> constriction.stream.model.Categorical:
    return _model(np.array([zero_frequency, FREQUENCY_SCALE - zero_frequency]))


def _raw_widths(classes: np.ndarray, coder: int) -> np.ndarray:
    """How many of each magnitude's bits are raw: those below the leading one, and for coder 2
    below the range-coded one after it."""
    return np.maximum(classes - (1 if coder == 1 else 2), 0)


def _top_bits(magnitudes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Coder 2: the bit below each leading one (0 for classes 0 and 1, which have none)."""
    return np.where(classes >= 2, magnitudes >> np.maximum(classes - 2, 0), 0) & 1


def _raw_bits(differences: np.ndarray, classes: np.ndarray, coder: int) -> np.ndarray:
    """Signs of the nonzero differences (1: negative), then each magnitude's raw bits
    (:func:`_raw_widths`), most significant first."""
    signs = (differences[differences != 0] < 0).astype(np.uint8)
    widths = _raw_widths(classes, coder)
    low = np.abs(differences) & ((1 << widths) - 1)
    shifts = _shifts(widths)
    bits = ((low[:, None] >> shifts) & 1).astype(np.uint8)
    return np.concatenate([signs, bits[shifts < widths[:, None]]])


def _shifts(widths: np.ndarray) -> np.ndarray:
    return np.arange(max(int(widths.max(initial=0)), 1) - 1, -1, -1)


def _ideal_bits(differences: np.ndarray, contexts: np.ndarray | None = None) -> float:
    """What coding ``differences`` costs under ideal tables, one per context (one in all
    without ``contexts``): their classes' entropy, plus the signs and low bits."""
    classes = _bit_length(np.abs(differences))
    if contexts is None:
        contexts = np.zeros_like(classes)
    counts = _class_counts(contexts, classes, int(contexts.max(initial=0)) + 1)
    raw = np.count_nonzero(differences) + float(np.maximum(classes - 1, 0).sum())
    return _entropy_bits(counts) + raw


def _choose_prediction(
    flat: np.ndarray, steps: list[_Step], coder: int
) -> tuple[int, bool, list[_Interpolation]]:
    """The weight (and, coder 2, whether the cubic or the mean) whose differences cost least
    under one ideal table: on the finest step (half the tile) for the weight, over every step
    for the interpolation (a cubic that wins on neighbours one pixel apart can lose on noise
    sixteen apart); and the chosen interpolation of every step. Residuals with spatial
    structure want the full interpolation (4); uncorrelated noise wants none (0)."""
    options = []
    for cubic in (True, False) if coder == 2 else (False,):
        interpolations = [_interpolation(flat, step, cubic) for step in steps]
        finest = flat[steps[-1].positions]
        weight = min(
            range(WEIGHTS),
            key=lambda w: _ideal_bits(finest - interpolations[-1].prediction(w)),
        )
        options.append((weight, cubic, interpolations))
    if len(options) == 1:
        return options[0]

    def cost(option: tuple[int, bool, list[_Interpolation]]) -> float:
        weight, _, interpolations = option
        refined = zip(steps[1:], interpolations[1:], strict=True)
        return sum(
            _ideal_bits(flat[step.positions] - interpolation.prediction(weight))
            for step, interpolation in refined
        )

    return min(options, key=cost)


def _grid_differences_pay(values: np.ndarray, shape: tuple[int, int]) -> bool:
    """Coder 2: whether the coarse grid costs less as differences than as values."""
    return _ideal_bits(_coarse_differences(values, shape)) < _ideal_bits(values)


@dataclass(frozen=True)
class _CodedStep:
    differences: np.ndarray
    classes: np.ndarray
    contexts: np.ndarray


def _table_bytes(counts: np.ndarray) -> tuple[bytes, list[np.ndarray | None]]:
    """Per context: the written table and its frequencies (None: the context is unused)."""
    out = bytearray()
    frequencies: list[np.ndarray | None] = []
    for context_counts in counts:
        if not context_counts.any():
            out.append(0)
            frequencies.append(None)
            continue
        table = _frequencies(context_counts)
        used = int(np.flatnonzero(table).max()) + 1
        out.append(used)
        for value in table[:used]:
            out += leb128(int(value))
        frequencies.append(table[:used])
    return bytes(out), frequencies


def _class_counts(contexts: np.ndarray, classes: np.ndarray, count: int) -> np.ndarray:
    """``(count, CLASSES)``: how often each class occurs in each context."""
    flat = np.bincount(contexts * CLASSES + classes, minlength=count * CLASSES)
    return flat.reshape(count, CLASSES)


def _code_steps(
    indices: np.ndarray,
    weight: int,
    interpolations: list[_Interpolation],
    grid: bool,
    coder: int,
) -> list[_CodedStep]:
    """Each step's differences from its predictions, their classes and contexts."""
    flat = indices.ravel()
    magnitudes = np.zeros_like(flat)
    coded = []
    steps = zip(_steps(indices.shape), interpolations, strict=True)
    for index, (step, interpolation) in enumerate(steps):
        contexts = _contexts(flat, magnitudes, step, coder)
        values = flat[step.positions]
        if index == 0 and grid:
            differences = _coarse_differences(values, indices.shape)
        else:
            differences = values - interpolation.prediction(weight)
        magnitudes[step.positions] = np.abs(differences)
        coded.append(_CodedStep(differences, _bit_length(np.abs(differences)), contexts))
    return coded


def _class_tables(
    coded: list[_CodedStep], coder: int
) -> tuple[bytes, list[np.ndarray | None], bool]:
    """The written class tables, their frequencies, and whether they are coder 1's 17 spread
    contexts (coder 2 takes those where their tables save more than they lose)."""
    classes = np.concatenate([step.classes for step in coded])
    contexts = np.concatenate([step.contexts for step in coded])
    counts = _class_counts(contexts, classes, CONTEXTS[coder])
    tables, frequencies = _table_bytes(counts)
    if coder == 1:
        return tables, frequencies, False
    merged = _class_counts(_spread_only(contexts), classes, CONTEXTS[1])
    merged_tables, merged_frequencies = _table_bytes(merged)
    if 8 * len(merged_tables) + _entropy_bits(merged) < 8 * len(tables) + _entropy_bits(counts):
        return merged_tables, merged_frequencies, True
    return tables, frequencies, False


def _top_tables(coded: list[_CodedStep]) -> tuple[bytes, dict[int, int]]:
    """Coder 2's written tables for the bits below the leading ones, and their frequencies."""
    classes = np.concatenate([step.classes for step in coded])
    tops = _top_bits(np.abs(np.concatenate([step.differences for step in coded])), classes)
    top_classes = range(TOP_CLASSES.start, max(int(classes.max(initial=0)) + 1, 2))
    out = bytearray([len(top_classes)])
    zero_frequencies = {}
    for top_class in top_classes:
        zero_frequencies[top_class] = _zero_frequency(tops[classes == top_class])
        out += leb128(zero_frequencies[top_class])
    return bytes(out), zero_frequencies


def _entropy_code(
    coded: list[_CodedStep],
    frequencies: list[np.ndarray | None],
    zero_frequencies: dict[int, int],
    coder: int,
) -> tuple[bytes, bytes]:
    """The range-coded part and the raw bits, step by step."""
    encoder = constriction.stream.queue.RangeEncoder()
    raw = []
    for step in coded:
        for context, frequency in enumerate(frequencies):
            if frequency is not None and _coded(frequency):
                symbols = step.classes[step.contexts == context]
                if symbols.size:
                    encoder.encode(symbols.astype(np.int32), _model(frequency))
        tops = _top_bits(np.abs(step.differences), step.classes)
        for top_class, zero_frequency in zero_frequencies.items():
            bits = tops[step.classes == top_class]
            if bits.size and 0 < zero_frequency < FREQUENCY_SCALE:
                encoder.encode(bits.astype(np.int32), _bit_model(zero_frequency))
        raw.append(_raw_bits(step.differences, step.classes, coder))
    return words_to_bytes(encoder.get_compressed()), np.packbits(np.concatenate(raw)).tobytes()


def encode_residual(indices: np.ndarray, coder: int = LATEST_CODER, smooth: bool = False) -> bytes:
    """One tile's ``(h, w)`` quantization indices as a residual segment of ``coder``; with
    ``smooth`` (coder 2), one whose decoder smooths (:func:`reconstruct`)."""
    _check_coder(coder)
    if smooth and coder == 1:
        raise ValueError("residual coder 1 has no smoothing")
    if indices.ndim != 2 or np.abs(indices).max(initial=0) > MAX_INDEX:
        raise ValueError(f"indices must be a 2-D array within +-{MAX_INDEX}")
    indices = indices.astype(np.int64)
    flat, steps = indices.ravel(), _steps(indices.shape)
    weight, cubic, interpolations = _choose_prediction(flat, steps, coder)
    grid = coder == 2 and _grid_differences_pay(flat[steps[0].positions], indices.shape)
    coded = _code_steps(indices, weight, interpolations, grid, coder)
    tables, frequencies, spread_only = _class_tables(coded, coder)
    if spread_only:
        coded = [replace(step, contexts=_spread_only(step.contexts)) for step in coded]
    zero_frequencies: dict[int, int] = {}
    if coder == 2:
        top_tables, zero_frequencies = _top_tables(coded)
        tables += top_tables
    flags = (0 if cubic or coder == 1 else MEAN_PREDICTION) | (GRID_DIFFERENCES if grid else 0)
    flags |= (SPREAD_ONLY if spread_only else 0) | (SMOOTHED if smooth else 0)
    coded_part, raw = _entropy_code(coded, frequencies, zero_frequencies, coder)
    return bytes([weight | flags]) + tables + leb128(len(coded_part)) + coded_part + raw


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def byte(self, what: str) -> int:
        if self.offset >= len(self.data):
            raise EntropyCodingError(f"residual segment truncated in {what}")
        self.offset += 1
        return self.data[self.offset - 1]

    def leb128(self, what: str) -> int:
        value, used = read_leb128(self.data[self.offset :], what)
        self.offset += used
        return value

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            raise EntropyCodingError(f"residual segment truncated in {what}")
        self.offset += size
        return self.data[self.offset - size : self.offset]


def _read_tables(cursor: _Cursor, contexts: int) -> list[np.ndarray | None]:
    tables: list[np.ndarray | None] = []
    for context in range(contexts):
        used = cursor.byte("context tables")
        if used > CLASSES:
            raise EntropyCodingError(f"residual context {context} has {used} classes")
        if not used:
            tables.append(None)
            continue
        frequencies = np.array([cursor.leb128("context tables") for _ in range(used)])
        if frequencies.sum() != FREQUENCY_SCALE or frequencies[-1] == 0:
            raise EntropyCodingError(f"residual context {context} has a malformed table")
        tables.append(frequencies)
    return tables


def _read_zero_frequencies(cursor: _Cursor) -> dict[int, int]:
    count = cursor.byte("leading-bit tables")
    if count > len(TOP_CLASSES):
        raise EntropyCodingError(f"residual segment has {count} leading-bit tables")
    frequencies = {}
    for top_class in TOP_CLASSES[:count]:
        frequencies[top_class] = cursor.leb128("leading-bit tables")
        if frequencies[top_class] > FREQUENCY_SCALE:
            raise EntropyCodingError(f"residual class {top_class} has a malformed bit table")
    return frequencies


def _decode_classes(
    decoder: constriction.stream.queue.RangeDecoder,
    table: np.ndarray | None,
    count: int,
    context: int,
) -> np.ndarray:
    if table is None:
        raise EntropyCodingError(f"residual context {context} has symbols but no table")
    if not _coded(table):
        return np.full(count, int(np.flatnonzero(table)[0]), dtype=np.int64)
    classes = decoder.decode(_model(table), count).astype(np.int64)
    if (table[classes] == 0).any():
        raise EntropyCodingError("residual segment decodes to a class its table excludes")
    return classes


def _decode_top_bits(
    decoder: constriction.stream.queue.RangeDecoder,
    zero_frequencies: dict[int, int],
    classes: np.ndarray,
) -> np.ndarray:
    """Coder 2: the bit below each leading one, class by class (0 where there is none)."""
    tops = np.zeros(classes.size, dtype=np.int64)
    if classes.max(initial=0) >= TOP_CLASSES.start + len(zero_frequencies):
        raise EntropyCodingError("residual segment decodes to a class with no leading-bit table")
    for top_class, zero_frequency in zero_frequencies.items():
        where = np.flatnonzero(classes == top_class)
        if not where.size or zero_frequency == FREQUENCY_SCALE:
            continue
        if not zero_frequency:
            tops[where] = 1
            continue
        tops[where] = decoder.decode(_bit_model(zero_frequency), where.size)
    return tops


def _read_raw(
    classes: np.ndarray, tops: np.ndarray, raw: np.ndarray, start: int, coder: int
) -> tuple[np.ndarray, int]:
    """Inverse of :func:`_raw_bits` from ``raw[start:]``: the signed differences whose
    ``classes`` (and, coder 2, bits below the leading one) are known, and where the next
    step's bits start."""
    nonzero = classes > 0
    widths = _raw_widths(classes, coder)
    signs_end = start + int(nonzero.sum())
    end = signs_end + int(widths.sum())
    if end > raw.size:
        raise EntropyCodingError("residual segment truncated in its raw bits")
    shifts = _shifts(widths)
    keep = shifts < widths[:, None]
    bits = np.zeros(keep.shape, dtype=np.int64)
    bits[keep] = raw[signs_end:end]
    leading = np.where(nonzero, 1 << np.maximum(classes - 1, 0), 0)
    magnitudes = leading + (tops << widths) + (bits << shifts).sum(axis=1)
    negative = np.zeros(classes.size, dtype=bool)
    negative[nonzero] = raw[start:signs_end].astype(bool)
    return np.where(negative, -magnitudes, magnitudes), end


def decode_residual(data: bytes, shape: tuple[int, int], coder: int = LATEST_CODER) -> np.ndarray:
    """Inverse of :func:`encode_residual`: the ``shape`` array of indices."""
    _check_coder(coder)
    try:
        cursor = _Cursor(data)
        first = cursor.byte("prediction weight")
        flags = SPREAD_ONLY | MEAN_PREDICTION | GRID_DIFFERENCES | SMOOTHED if coder == 2 else 0
        weight, spread_only = first & ~flags, bool(first & flags & SPREAD_ONLY)
        cubic = coder == 2 and not first & MEAN_PREDICTION
        grid_differences = bool(first & flags & GRID_DIFFERENCES)
        if weight >= WEIGHTS:
            raise EntropyCodingError(f"residual prediction weight byte {first} out of range")
        contexts_used = CONTEXTS[1] if spread_only else CONTEXTS[coder]
        tables = _read_tables(cursor, contexts_used)
        zero_frequencies = _read_zero_frequencies(cursor) if coder == 2 else {}
        coded = cursor.take(cursor.leb128("classes length"), "classes")
        decoder = constriction.stream.queue.RangeDecoder(bytes_to_words(coded))
        raw = np.unpackbits(np.frombuffer(data[cursor.offset :], dtype=np.uint8))
        flat = np.zeros(shape[0] * shape[1], dtype=np.int64)
        magnitudes = np.zeros_like(flat)
        used = 0
        for index, step in enumerate(_steps(shape)):
            contexts = _contexts(flat, magnitudes, step, coder)
            if spread_only:
                contexts = _spread_only(contexts)
            classes = np.zeros(step.positions.size, dtype=np.int64)
            for context in range(contexts_used):
                where = np.flatnonzero(contexts == context)
                if where.size:
                    classes[where] = _decode_classes(decoder, tables[context], where.size, context)
            tops = (
                _decode_top_bits(decoder, zero_frequencies, classes)
                if coder == 2
                else np.zeros_like(classes)
            )
            differences, used = _read_raw(classes, tops, raw, used, coder)
            if index == 0 and grid_differences:
                values = _coarse_values(differences, shape)
            else:
                values = _interpolation(flat, step, cubic).prediction(weight) + differences
            if np.abs(values).max(initial=0) > MAX_INDEX:
                raise EntropyCodingError(f"residual segment decodes beyond +-{MAX_INDEX}")
            flat[step.positions] = values
            magnitudes[step.positions] = np.abs(differences)
        if -(-used // 8) != len(data) - cursor.offset:
            raise EntropyCodingError(
                f"residual segment has {len(data) - cursor.offset} raw bytes, its classes "
                f"need {-(-used // 8)}"
            )
    except (ValueError, RuntimeError, OverflowError, AssertionError) as error:  # constriction
        if isinstance(error, EntropyCodingError):
            raise
        raise EntropyCodingError(f"residual segment does not decode: {error}") from error
    return flat.reshape(shape)
