"""Context-model entropy coding of the binarizer's bits with constriction's range coder.

One iteration of one tile is a ``(channels, height, width)`` array of 0/1 bits. It is coded in
two checkerboard passes so that every probability is known before the pass starts, which lets
each pass go through the coder as one vectorised call:

* pass A (``(row + col)`` even) is conditioned on the channel, the iteration, the same bit in
  the previous iteration and the sum of its four neighbours in the previous iteration;
* pass B (odd squares) is conditioned on the channel, the iteration, the same bit in the
  previous iteration and the sum of its four neighbours in *this* iteration, all from pass A.

Probabilities come from integer tables (``P(1)`` in 1/65536 units) fitted once on training codes
and shipped with the weights. ``table / 65536`` is exact in float64, so every machine hands the
coder identical probabilities and decodes identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

from codec.bitstream import BitstreamError, leb128

PROBABILITY_SCALE = 1 << 16
ITERATION_BUCKETS = 4  # iterations 0, 1, 2, and 3+ share statistics
PREVIOUS_STATES = 3  # previous bit 0, 1, or no previous iteration
NEIGHBOUR_SUMS = 9  # sum of four +-1 neighbours (0 where outside): -4..4
_MODEL = constriction.stream.model.Bernoulli(perfect=False)


class EntropyCodingError(BitstreamError):
    """A segment that does not decode under the given tables (corrupt or foreign data)."""


@dataclass(frozen=True)
class ContextTables:
    """``P(bit = 1)`` per context, as uint16 numerators over 65536, for both passes."""

    pass_a: np.ndarray  # (channels, ITERATION_BUCKETS, PREVIOUS_STATES, NEIGHBOUR_SUMS)
    pass_b: np.ndarray

    @classmethod
    def uniform(cls, channels: int) -> ContextTables:
        shape = (channels, ITERATION_BUCKETS, PREVIOUS_STATES, NEIGHBOUR_SUMS)
        half = np.full(shape, PROBABILITY_SCALE // 2, dtype=np.uint16)
        return cls(half, half.copy())

    @property
    def channels(self) -> int:
        return int(self.pass_a.shape[0])


def _checkerboard(height: int, width: int) -> np.ndarray:
    rows, cols = np.indices((height, width))
    return (rows + cols) % 2 == 0


def _signed(bits: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """0/1 bits as -1/+1, and 0 where a block is not coded (as outside the array)."""
    signed = bits.astype(np.int64) * 2 - 1
    return signed if active is None else signed * active


def _neighbour_sum(signed: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    """Sum of the four neighbours' -1/0/+1 values (0 outside the array), shifted to 0..8."""
    if signed is None:
        return np.full(shape, NEIGHBOUR_SUMS // 2, dtype=np.int64)
    padded = np.pad(signed, ((0, 0), (1, 1), (1, 1)))
    total = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return total + NEIGHBOUR_SUMS // 2


def _previous_state(previous: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    if previous is None:
        return np.full(shape, 2, dtype=np.int64)
    return previous.astype(np.int64)


def _context_probabilities(
    table: np.ndarray, iteration: int, previous: np.ndarray | None, neighbours: np.ndarray
) -> np.ndarray:
    shape = neighbours.shape
    channel = np.broadcast_to(np.arange(shape[0])[:, None, None], shape)
    bucket = min(iteration, ITERATION_BUCKETS - 1)
    numerators = table[channel, bucket, _previous_state(previous, shape), neighbours]
    return numerators.astype(np.float64) / PROBABILITY_SCALE


@dataclass(frozen=True)
class _Blocks:
    """Which code positions an iteration codes: all of them (format 1), or those of the
    blocks still refining (format 2), a subset of the previous iteration's."""

    shape: tuple[int, int, int]
    active: np.ndarray  # (h, w) bool
    previous_active: np.ndarray | None  # None: first iteration, or format 1

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions of pass A and of pass B, each restricted to active blocks."""
        board = _checkerboard(*self.shape[1:])
        return (
            np.broadcast_to(board & self.active, self.shape),
            np.broadcast_to(~board & self.active, self.shape),
        )

    def previous_signed(self, previous: np.ndarray | None) -> np.ndarray | None:
        if previous is None:
            return None
        return _signed(previous, self.previous_active)


def _pass_probabilities(
    tables: ContextTables,
    iteration: int,
    previous: np.ndarray | None,
    pass_a_signed: np.ndarray | None,
    blocks: _Blocks,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position probabilities for pass A, and for pass B given pass A's bits."""
    shape = blocks.shape
    if shape[0] != tables.channels:
        raise ValueError(f"codes have {shape[0]} channels, tables {tables.channels}")
    prob_a = _context_probabilities(
        tables.pass_a, iteration, previous, _neighbour_sum(blocks.previous_signed(previous), shape)
    )
    prob_b = (
        _context_probabilities(
            tables.pass_b, iteration, previous, _neighbour_sum(pass_a_signed, shape)
        )
        if pass_a_signed is not None
        else prob_a
    )
    return prob_a, prob_b


def _stop_probability(continuing: int, candidates: int) -> np.ndarray:
    """P(a block keeps refining), from the count the segment states: exact in float64."""
    return np.array([continuing / candidates], dtype=np.float64)


def words_to_bytes(words: np.ndarray) -> bytes:
    # The coder emits 32-bit words; trailing zero bytes are implied and restored on decode.
    return words.astype("<u4").tobytes().rstrip(b"\0")


def bytes_to_words(data: bytes) -> np.ndarray:
    padded = data + b"\0" * (-len(data) % 4)
    return np.frombuffer(padded, dtype="<u4").astype(np.uint32)


def read_leb128(data: bytes, what: str) -> tuple[int, int]:
    """The value at the start of ``data`` and how many bytes it took."""
    value = 0
    for index, byte in enumerate(data[:5]):
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    raise EntropyCodingError(f"malformed {what}")


def encode_iteration(
    bits: np.ndarray,
    previous: np.ndarray | None,
    iteration: int,
    tables: ContextTables,
    active: np.ndarray | None = None,
    previous_active: np.ndarray | None = None,
) -> bytes:
    """Range-code one iteration's ``(channels, h, w)`` 0/1 bits.

    With ``previous_active`` (format 2, iterations after the first), the segment first says
    which of those blocks are still ``active`` (a LEB128 count, then one flag per block coded
    at that rate), and then codes the bits of active blocks only: a block that stopped costs
    nothing more.
    """
    bits = bits.astype(np.uint8)
    height, width = bits.shape[1:]
    if active is None:
        active = np.ones((height, width), dtype=bool)
    if previous_active is None and not active.all():
        raise ValueError("blocks can only stop after the first iteration")
    if previous_active is not None and (active & ~previous_active).any():
        raise ValueError("a block that stopped cannot start again")
    blocks = _Blocks(bits.shape, active, previous_active)
    mask_a, mask_b = blocks.masks()
    pass_a = np.where(mask_a, _signed(bits), 0)
    prob_a, prob_b = _pass_probabilities(tables, iteration, previous, pass_a, blocks)
    encoder = constriction.stream.queue.RangeEncoder()
    prefix = b""
    if previous_active is not None:
        candidates, continuing = int(previous_active.sum()), int(active.sum())
        prefix = leb128(continuing)
        if 0 < continuing < candidates:
            flags = active[previous_active].astype(np.int32)
            probability = _stop_probability(continuing, candidates)
            encoder.encode(flags, _MODEL, np.broadcast_to(probability, flags.shape))
    encoder.encode(bits[mask_a].astype(np.int32), _MODEL, prob_a[mask_a])
    encoder.encode(bits[mask_b].astype(np.int32), _MODEL, prob_b[mask_b])
    return prefix + words_to_bytes(encoder.get_compressed())


def decode_iteration(
    data: bytes,
    shape: tuple[int, int, int],
    previous: np.ndarray | None,
    iteration: int,
    tables: ContextTables,
    previous_active: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_iteration`: the ``shape`` array of 0/1 bits (0 in blocks not
    coded) and the ``(h, w)`` mask of blocks this iteration codes."""
    try:
        active = np.ones(shape[1:], dtype=bool)
        if previous_active is not None:
            continuing, used = read_leb128(data, "block count")
            data = data[used:]
            candidates = int(previous_active.sum())
            if continuing > candidates:
                raise EntropyCodingError(
                    f"segment continues {continuing} blocks of {candidates} still refining"
                )
        decoder = constriction.stream.queue.RangeDecoder(bytes_to_words(data))
        if previous_active is not None:
            active = previous_active.copy() if continuing == candidates else np.zeros_like(active)
            if 0 < continuing < candidates:
                probability = _stop_probability(continuing, candidates)
                flags = decoder.decode(_MODEL, np.broadcast_to(probability, (candidates,)))
                if int(flags.sum()) != continuing:
                    raise EntropyCodingError(
                        f"segment says {continuing} blocks go on but its flags say {flags.sum()}"
                    )
                active[previous_active] = flags.astype(bool)
        blocks = _Blocks(shape, active, previous_active)
        mask_a, mask_b = blocks.masks()
        prob_a, _ = _pass_probabilities(tables, iteration, previous, None, blocks)
        bits = np.zeros(shape, dtype=np.uint8)
        bits[mask_a] = decoder.decode(_MODEL, prob_a[mask_a])
        pass_a = np.where(mask_a, _signed(bits), 0)
        _, prob_b = _pass_probabilities(tables, iteration, previous, pass_a, blocks)
        bits[mask_b] = decoder.decode(_MODEL, prob_b[mask_b])
    except (ValueError, RuntimeError, OverflowError, AssertionError) as error:  # constriction
        if isinstance(error, EntropyCodingError):
            raise
        raise EntropyCodingError(f"entropy-coded segment does not decode: {error}") from error
    return bits, active


def fit_tables(code_sequences: list[list[np.ndarray]], channels: int) -> ContextTables:
    """Fit tables from codes: each sequence is one tile's iterations of 0/1 bits.

    Counts get half a pseudo-count per outcome, and probabilities are kept inside
    [1/4096, 1 - 1/4096] so that an unexpected bit never costs more than 12 bits.
    """
    shape = (channels, ITERATION_BUCKETS, PREVIOUS_STATES, NEIGHBOUR_SUMS)
    ones = [np.full(shape, 0.5), np.full(shape, 0.5)]
    totals = [np.full(shape, 1.0), np.full(shape, 1.0)]
    for sequence in code_sequences:
        previous: np.ndarray | None = None
        for iteration, bits in enumerate(sequence):
            bits = bits.astype(np.int64)
            full = bits.shape
            channel = np.broadcast_to(np.arange(full[0])[:, None, None], full)
            bucket = np.full(full, min(iteration, ITERATION_BUCKETS - 1))
            state = _previous_state(previous, full)
            mask_a = np.broadcast_to(_checkerboard(*full[1:]), full)
            pass_a = np.where(mask_a, _signed(bits), 0)
            previous_signed = None if previous is None else _signed(previous)
            neighbours = (_neighbour_sum(previous_signed, full), _neighbour_sum(pass_a, full))
            for index, mask in enumerate((mask_a, ~mask_a)):
                where = (channel[mask], bucket[mask], state[mask], neighbours[index][mask])
                np.add.at(ones[index], where, bits[mask])
                np.add.at(totals[index], where, 1.0)
            previous = bits
    low, high = PROBABILITY_SCALE // 4096, PROBABILITY_SCALE - PROBABILITY_SCALE // 4096
    fitted = [
        np.clip(np.rint(o / t * PROBABILITY_SCALE), low, high).astype(np.uint16)
        for o, t in zip(ones, totals, strict=True)
    ]
    return ContextTables(fitted[0], fitted[1])
