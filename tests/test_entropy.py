"""Context-model entropy coding: exact round trips and a real saving on structured bits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec.entropy import (
    ContextTables,
    EntropyCodingError,
    decode_iteration,
    encode_iteration,
    fit_tables,
)


def correlated_codes(rng: np.random.Generator, iterations: int) -> list[np.ndarray]:
    """Bits with spatial and inter-iteration structure, like a binarizer's on smooth images."""
    base = rng.random((8, 12, 10)) < 0.5
    smooth = np.repeat(np.repeat(base[:, ::2, ::2], 2, axis=1), 2, axis=2)
    codes = []
    for _ in range(iterations):
        flips = rng.random(smooth.shape) < 0.1
        codes.append((smooth ^ flips).astype(np.uint8))
        smooth = codes[-1].astype(bool)
    return codes


def round_trip(codes: list[np.ndarray], tables: ContextTables) -> tuple[list[np.ndarray], int]:
    decoded, previous, total = [], None, 0
    for k, bits in enumerate(codes):
        data = encode_iteration(bits, None if k == 0 else codes[k - 1], k, tables)
        total += len(data)
        previous, _ = decode_iteration(data, bits.shape, previous, k, tables)
        decoded.append(previous)
    return decoded, total


def test_uniform_tables_round_trip_at_about_one_bit_per_bit() -> None:
    codes = correlated_codes(np.random.default_rng(0), 4)
    decoded, total = round_trip(codes, ContextTables.uniform(8))
    assert all(np.array_equal(a, b) for a, b in zip(codes, decoded, strict=True))
    raw_bytes = sum(c.size for c in codes) / 8
    assert 0.95 * raw_bytes <= total <= 1.05 * raw_bytes


def test_fitted_tables_save_bits_on_structured_codes() -> None:
    rng = np.random.default_rng(1)
    tables = fit_tables([correlated_codes(rng, 4) for _ in range(30)], channels=8)
    codes = correlated_codes(rng, 4)
    decoded, total = round_trip(codes, tables)
    assert all(np.array_equal(a, b) for a, b in zip(codes, decoded, strict=True))
    raw_bytes = sum(c.size for c in codes) / 8
    assert total < 0.75 * raw_bytes


def test_channel_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="channels"):
        encode_iteration(np.zeros((4, 2, 2), np.uint8), None, 0, ContextTables.uniform(8))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_random_segments_decode_to_bits_or_fail_cleanly(data: bytes) -> None:
    try:
        bits, _ = decode_iteration(data, (8, 5, 7), None, 0, ContextTables.uniform(8))
    except EntropyCodingError:
        return
    assert bits.shape == (8, 5, 7)
    assert set(np.unique(bits)) <= {0, 1}


def test_context_probe_finds_information_a_context_carries() -> None:
    """The probe behind docs/codec.md's context table: bits that copy another channel cost
    about nothing under the context that sees it, and a coin's worth under the shipped ones."""
    from codec.bench.context_probe import CONTEXT_SETS, ITERATIONS, cross_entropy

    rng = np.random.default_rng(5)

    def sequence() -> list[np.ndarray]:
        codes = []
        for _ in range(ITERATIONS):
            first = rng.integers(0, 2, (16, 8, 8))
            codes.append(np.concatenate([first, first]))  # channel c + 16 repeats channel c
        return codes

    fit, test = [sequence() for _ in range(20)], [sequence() for _ in range(2)]
    shipped = cross_entropy(fit, test, CONTEXT_SETS["shipped"])
    paired = cross_entropy(fit, test, CONTEXT_SETS["channel-pair"])
    assert np.all(shipped > 0.95)
    assert np.all(paired < 0.6)  # half the bits are free: about 0.5 bits per bit
