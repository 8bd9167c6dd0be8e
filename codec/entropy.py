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

from codec.bitstream import BitstreamError

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


def _neighbour_sum(bits: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    """Sum of the four neighbours as +-1 (0 outside the array), shifted to 0..8."""
    if bits is None:
        return np.full(shape, NEIGHBOUR_SUMS // 2, dtype=np.int64)
    signed = np.pad(bits.astype(np.int64) * 2 - 1, ((0, 0), (1, 1), (1, 1)))
    total = signed[:, :-2, 1:-1] + signed[:, 2:, 1:-1] + signed[:, 1:-1, :-2] + signed[:, 1:-1, 2:]
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


def _pass_probabilities(
    tables: ContextTables,
    iteration: int,
    previous: np.ndarray | None,
    pass_a_bits: np.ndarray | None,
    shape: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position probabilities for pass A, and for pass B given pass A's bits."""
    if shape[0] != tables.channels:
        raise ValueError(f"codes have {shape[0]} channels, tables {tables.channels}")
    prob_a = _context_probabilities(
        tables.pass_a, iteration, previous, _neighbour_sum(previous, shape)
    )
    prob_b = (
        _context_probabilities(
            tables.pass_b, iteration, previous, _neighbour_sum(pass_a_bits, shape)
        )
        if pass_a_bits is not None
        else prob_a
    )
    return prob_a, prob_b


def _words_to_bytes(words: np.ndarray) -> bytes:
    # The coder emits 32-bit words; trailing zero bytes are implied and restored on decode.
    return words.astype("<u4").tobytes().rstrip(b"\0")


def _bytes_to_words(data: bytes) -> np.ndarray:
    padded = data + b"\0" * (-len(data) % 4)
    return np.frombuffer(padded, dtype="<u4").astype(np.uint32)


def encode_iteration(
    bits: np.ndarray, previous: np.ndarray | None, iteration: int, tables: ContextTables
) -> bytes:
    """Range-code one iteration's ``(channels, h, w)`` 0/1 bits."""
    bits = bits.astype(np.uint8)
    mask_a = np.broadcast_to(_checkerboard(*bits.shape[1:]), bits.shape)
    pass_a = np.where(mask_a, bits, 0)
    prob_a, prob_b = _pass_probabilities(tables, iteration, previous, pass_a, bits.shape)
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(bits[mask_a].astype(np.int32), _MODEL, prob_a[mask_a])
    encoder.encode(bits[~mask_a].astype(np.int32), _MODEL, prob_b[~mask_a])
    return _words_to_bytes(encoder.get_compressed())


def decode_iteration(
    data: bytes,
    shape: tuple[int, int, int],
    previous: np.ndarray | None,
    iteration: int,
    tables: ContextTables,
) -> np.ndarray:
    """Inverse of :func:`encode_iteration`: the ``shape`` array of 0/1 bits."""
    mask_a = np.broadcast_to(_checkerboard(*shape[1:]), shape)
    prob_a, _ = _pass_probabilities(tables, iteration, previous, None, shape)
    try:
        decoder = constriction.stream.queue.RangeDecoder(_bytes_to_words(data))
        bits = np.zeros(shape, dtype=np.uint8)
        bits[mask_a] = decoder.decode(_MODEL, prob_a[mask_a])
        _, prob_b = _pass_probabilities(tables, iteration, previous, bits, shape)
        bits[~mask_a] = decoder.decode(_MODEL, prob_b[~mask_a])
    except (ValueError, RuntimeError, OverflowError, AssertionError) as error:  # constriction
        raise EntropyCodingError(f"entropy-coded segment does not decode: {error}") from error
    return bits


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
            pass_a = np.where(mask_a, bits, 0)
            neighbours = (_neighbour_sum(previous, full), _neighbour_sum(pass_a, full))
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
