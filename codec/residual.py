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
already known (predicted by the mean of their four corners) and then the midpoints of their
sides (predicted by the mean of their four neighbours); the encoder scales the predictions by
0/4 to 4/4 per tile, whichever suits it (noise without structure is best not predicted). Each
step is one vectorised pass, and each index is coded as its difference ``d`` from the
prediction: the magnitude class (bit length of ``|d|``: 0 for 0, 1 for 1, 2 for 2-3, ...)
range-coded under a context, the bit length of the spread (max - min) of the neighbours the
prediction used, and then its sign and the bits below its leading one, raw (they are close to
uniform). Each context's class frequencies are integers summing to 65536, fitted on the tile
by the encoder and written in the segment, so decoding needs no model, only integer
arithmetic, and is exact on any machine. Segment layout
(docs/bitstream.md, version 4):

    u8                 prediction weight w: predictions are w/4 of the neighbours' mean
    per context (17)   u8 class count n, then n LEB128 frequencies (n = 0: context unused)
    LEB128             byte length of the range-coded classes
    range-coded        classes, step by step; within a step, context by context, in the
                       step's row-major order
    raw bits           step by step: signs of the nonzero differences (1: negative), then the
                       bits below each leading one, most significant first; zero-padded to a byte
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import constriction
import numpy as np

from codec.bitstream import leb128
from codec.entropy import EntropyCodingError, bytes_to_words, read_leb128, words_to_bytes

FREQUENCY_SCALE = 1 << 16
MAX_INDEX = (1 << 16) - 1  # the largest residual of 16-bit pixels
CLASSES = 18  # bit lengths 0..17 of a difference from a prediction, |d| <= 2 * MAX_INDEX
CONTEXTS = 17  # the coarse grid, then 1 + the bit length of the neighbours' spread (0..15)
TOP_STRIDE = 16  # the coarse grid's spacing: a power of two
WEIGHTS = 5  # predictions are 0/4 .. 4/4 of the neighbours' mean, chosen per tile


def quantize(residual: np.ndarray, max_error: int) -> np.ndarray:
    """Indices whose reconstruction is within ``max_error`` of ``residual`` everywhere."""
    if max_error < 0:
        raise ValueError(f"max error must be at least 0, got {max_error}")
    magnitude = (np.abs(residual.astype(np.int64)) + max_error) // (2 * max_error + 1)
    return np.sign(residual).astype(np.int64) * magnitude


def reconstruct(base: np.ndarray, indices: np.ndarray, max_error: int, peak: int) -> np.ndarray:
    """``base`` corrected by the layer, in ``base``'s dtype (clipping only moves a pixel
    closer to the original, which lies in ``[0, peak]``)."""
    corrected = base.astype(np.int64) + indices * (2 * max_error + 1)
    return np.clip(corrected, 0, peak).astype(base.dtype)


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2**53: frexp's exponent, which is exact (a
    power-of-two split of a float that holds the integer exactly; no logarithm, no rounding)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


@dataclass(frozen=True)
class _Step:
    """Positions coded together, and the neighbours (already decoded) that predict them."""

    positions: np.ndarray  # flat indices into the tile, row-major
    #: (n, k) flat indices of each position's neighbours; one outside the tile is replaced by
    #: one inside (for the spread), and ``valid`` zeroes it in the sum.
    neighbours: np.ndarray
    valid: np.ndarray  # (n, k) int64, 1 inside the tile and 0 outside
    count: np.ndarray  # (n,) neighbours inside the tile (at least 1 when k > 0)


def _grid(
    shape: tuple[int, int], start: tuple[int, int], stride: int
) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(
        np.arange(start[0], shape[0], stride), np.arange(start[1], shape[1], stride), indexing="ij"
    )
    return rows.ravel(), cols.ravel()


def _step(
    shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, offsets: list[tuple[int, int]]
) -> _Step:
    order = np.argsort(rows * shape[1] + cols, kind="stable")  # row-major
    rows, cols = rows[order], cols[order]
    near_rows = rows[:, None] + np.array([dr for dr, _ in offsets])
    near_cols = cols[:, None] + np.array([dc for _, dc in offsets])
    valid = (near_rows >= 0) & (near_rows < shape[0]) & (near_cols >= 0) & (near_cols < shape[1])
    neighbours = near_rows * shape[1] + near_cols
    if offsets:  # every position has a neighbour inside; the first stands in for the others
        inside = neighbours[np.arange(rows.size), valid.argmax(axis=1)]
        neighbours = np.where(valid, neighbours, inside[:, None])
    count = valid.sum(axis=1)
    return _Step(rows * shape[1] + cols, neighbours, valid.astype(np.int64), count)


@functools.lru_cache(maxsize=8)
def _steps(shape: tuple[int, int]) -> list[_Step]:
    """Every position once: the coarse grid, then per halving its centres and side midpoints."""
    steps = [_step(shape, *_grid(shape, (0, 0), TOP_STRIDE), [])]
    stride = TOP_STRIDE
    while stride > 1:
        half = stride // 2
        corners = [(-half, -half), (-half, half), (half, -half), (half, half)]
        steps.append(_step(shape, *_grid(shape, (half, half), stride), corners))
        across, down = _grid(shape, (0, half), stride), _grid(shape, (half, 0), stride)
        sides = [(-half, 0), (half, 0), (0, -half), (0, half)]
        rows, cols = np.concatenate([across[0], down[0]]), np.concatenate([across[1], down[1]])
        steps.append(_step(shape, rows, cols, sides))
        stride = half
    return steps


@dataclass(frozen=True)
class _Neighbourhood:
    """What a step's known neighbours say about each of its positions."""

    total: np.ndarray  # sum of the neighbours' indices
    count: np.ndarray  # how many there are (0 on the coarse grid)
    contexts: np.ndarray  # 0 with no neighbours, else 1 + bit length of their spread (<= 15)

    def prediction(self, weight: int) -> np.ndarray:
        """``weight`` quarters of the neighbours' mean, rounded; 0 with none. Integer
        arithmetic, so every machine predicts the same."""
        if not self.count.any():
            return np.zeros(self.count.shape, dtype=np.int64)
        return (2 * weight * self.total + 4 * self.count) // (8 * self.count)


def _neighbourhood(flat: np.ndarray, step: _Step) -> _Neighbourhood:
    if step.neighbours.shape[1] == 0:
        zeros = np.zeros(step.positions.size, dtype=np.int64)
        return _Neighbourhood(zeros, zeros, zeros)
    values = flat[step.neighbours]
    spread = values.max(axis=1) - values.min(axis=1)
    contexts = 1 + np.minimum(_bit_length(spread), CONTEXTS - 2)
    return _Neighbourhood((values * step.valid).sum(axis=1), step.count, contexts)


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


def _raw_bits(differences: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Signs of the nonzero differences (1: negative), then each magnitude's bits below its
    leading one, most significant first."""
    signs = (differences[differences != 0] < 0).astype(np.uint8)
    widths = np.maximum(classes - 1, 0)
    low = np.abs(differences) - np.where(classes > 0, 1 << widths, 0)
    shifts = _shifts(widths)
    bits = ((low[:, None] >> shifts) & 1).astype(np.uint8)
    return np.concatenate([signs, bits[shifts < widths[:, None]]])


def _shifts(widths: np.ndarray) -> np.ndarray:
    return np.arange(max(int(widths.max(initial=0)), 1) - 1, -1, -1)


def _prediction_weight(flat: np.ndarray, steps: list[_Step]) -> int:
    """The weight whose differences look cheapest on the finest step (half the tile): about
    their bit lengths, a cheap stand-in for their coded size. Residuals with spatial structure
    want the full mean (4); uncorrelated noise wants none (0)."""
    finest = steps[-1]
    near, values = _neighbourhood(flat, finest), flat[finest.positions]

    def proxy(weight: int) -> int:
        return int(_bit_length(np.abs(values - near.prediction(weight))).sum())

    return min(range(WEIGHTS), key=proxy)


def encode_residual(indices: np.ndarray) -> bytes:
    """One tile's ``(h, w)`` quantization indices as a residual segment."""
    if indices.ndim != 2 or np.abs(indices).max(initial=0) > MAX_INDEX:
        raise ValueError(f"indices must be a 2-D array within +-{MAX_INDEX}")
    flat = indices.astype(np.int64).ravel()
    steps = _steps(indices.shape)
    weight = _prediction_weight(flat, steps)
    coded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per step
    for step in steps:
        near = _neighbourhood(flat, step)
        differences = flat[step.positions] - near.prediction(weight)
        coded.append((differences, _bit_length(np.abs(differences)), near.contexts))
    tables = bytearray([weight])
    all_classes = np.concatenate([classes for _, classes, _ in coded])
    all_contexts = np.concatenate([contexts for _, _, contexts in coded])
    counts = np.bincount(all_contexts * CLASSES + all_classes, minlength=CONTEXTS * CLASSES)
    frequencies: list[np.ndarray | None] = []
    for context_counts in counts.reshape(CONTEXTS, CLASSES):
        if not context_counts.any():
            tables.append(0)
            frequencies.append(None)
            continue
        table = _frequencies(context_counts)
        used = int(np.flatnonzero(table).max()) + 1
        tables.append(used)
        for value in table[:used]:
            tables += leb128(int(value))
        frequencies.append(table[:used])
    encoder = constriction.stream.queue.RangeEncoder()
    raw = []
    for differences, classes, contexts in coded:
        for context, frequency in enumerate(frequencies):
            if frequency is not None and _coded(frequency):
                symbols = classes[contexts == context]
                if symbols.size:
                    encoder.encode(symbols.astype(np.int32), _model(frequency))
        raw.append(_raw_bits(differences, classes))
    classes_bytes = words_to_bytes(encoder.get_compressed())
    packed = np.packbits(np.concatenate(raw)).tobytes()
    return bytes(tables) + leb128(len(classes_bytes)) + classes_bytes + packed


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


def _read_tables(cursor: _Cursor) -> list[np.ndarray | None]:
    tables: list[np.ndarray | None] = []
    for context in range(CONTEXTS):
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


def _read_raw(classes: np.ndarray, raw: np.ndarray, start: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`_raw_bits` from ``raw[start:]``: the signed differences whose
    ``classes`` are known, and where the next step's bits start."""
    nonzero = classes > 0
    widths = np.maximum(classes - 1, 0)
    signs_end = start + int(nonzero.sum())
    end = signs_end + int(widths.sum())
    if end > raw.size:
        raise EntropyCodingError("residual segment truncated in its raw bits")
    shifts = _shifts(widths)
    keep = shifts < widths[:, None]
    bits = np.zeros(keep.shape, dtype=np.int64)
    bits[keep] = raw[signs_end:end]
    magnitudes = np.where(nonzero, (1 << widths) + (bits << shifts).sum(axis=1), 0)
    negative = np.zeros(classes.size, dtype=bool)
    negative[nonzero] = raw[start:signs_end].astype(bool)
    return np.where(negative, -magnitudes, magnitudes), end


def decode_residual(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`encode_residual`: the ``shape`` array of indices."""
    try:
        cursor = _Cursor(data)
        weight = cursor.byte("prediction weight")
        if weight >= WEIGHTS:
            raise EntropyCodingError(f"residual prediction weight {weight} out of range")
        tables = _read_tables(cursor)
        coded = cursor.take(cursor.leb128("classes length"), "classes")
        decoder = constriction.stream.queue.RangeDecoder(bytes_to_words(coded))
        raw = np.unpackbits(np.frombuffer(data[cursor.offset :], dtype=np.uint8))
        flat = np.zeros(shape[0] * shape[1], dtype=np.int64)
        used = 0
        for step in _steps(shape):
            near = _neighbourhood(flat, step)
            prediction, contexts = near.prediction(weight), near.contexts
            classes = np.zeros(step.positions.size, dtype=np.int64)
            for context in range(CONTEXTS):
                where = np.flatnonzero(contexts == context)
                if where.size:
                    classes[where] = _decode_classes(decoder, tables[context], where.size, context)
            differences, used = _read_raw(classes, raw, used)
            values = prediction + differences
            if np.abs(values).max(initial=0) > MAX_INDEX:
                raise EntropyCodingError(f"residual segment decodes beyond +-{MAX_INDEX}")
            flat[step.positions] = values
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
