"""Rate control decisions, on plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codec.rate import RateControl, allocate_bytes, first_meeting


def test_exactly_one_mode_is_required() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RateControl()
    with pytest.raises(ValueError, match="exactly one"):
        RateControl(iterations=2, bpp=0.5)
    with pytest.raises(ValueError, match="min_ssim"):
        RateControl(min_ssim=1.5)
    assert RateControl(bpp=0.25).describe() == "bpp<=0.25"


def test_floor_picks_the_first_iteration_that_meets_it() -> None:
    assert first_meeting([30.0, 35.0, 40.0], 34.9) == 2
    assert first_meeting([30.0, 35.0], 50.0) is None


def test_bytes_go_where_they_remove_most_error() -> None:
    # Tile 0 is flat (iterations beyond the first remove little), tile 1 is busy.
    sizes = [[10, 10, 10], [10, 10, 10]]
    errors = [[5.0, 4.9, 4.8], [500.0, 100.0, 20.0]]
    assert allocate_bytes(sizes, errors, budget=40) == [1, 3]


@given(
    st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=6), min_size=1, max_size=8),
    st.integers(0, 400),
)
def test_allocation_never_exceeds_a_feasible_budget(sizes: list[list[int]], budget: int) -> None:
    errors = [[1000.0 / (k + 1) for k in range(len(s))] for s in sizes]
    chosen = allocate_bytes(sizes, errors, budget)
    assert all(1 <= k <= len(s) for k, s in zip(chosen, sizes, strict=True))
    spent = sum(sum(s[:k]) for s, k in zip(sizes, chosen, strict=True))
    minimum = sum(s[0] for s in sizes)
    assert spent <= max(budget, minimum)
