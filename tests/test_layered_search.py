"""The bpp search over layered tiles codes only the layers the allocation can use, and finds
the streams that coding every layer of the ladder finds; max errors put layers over coarse
corrections where that is smaller (real radiographs, real bytes, decoded pixels)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from codec.io import GrayImage
from codec.learned import decode_image
from codec.near_lossless import ResidualCandidates, ladder_max_errors, select_layered
from storage.dicom import read_dicom


def _fresh(candidates: ResidualCandidates) -> ResidualCandidates:
    """The same network coding with nothing layered yet: each search pays for its layers."""
    return replace(candidates, _layered={}, _coarse={}, _corrections={}, layer_seconds=0.0)


@pytest.fixture(scope="module")
def chest_candidates(chest_xray: GrayImage) -> ResidualCandidates:
    crop = GrayImage(np.ascontiguousarray(chest_xray.pixels[256:640, 192:704]), 8)
    return ResidualCandidates.for_bpp(crop, tile_size=128, half_res=True)


@pytest.fixture(scope="module")
def ten_bit_candidates(data_dir: Path) -> ResidualCandidates:
    image = read_dicom(data_dir / "CR-MONO1-10-chest.dcm").image
    return ResidualCandidates.for_bpp(image, tile_size=128)


@pytest.mark.parametrize("which", ["chest_candidates", "ten_bit_candidates"])
def test_the_lazy_search_finds_the_full_searchs_streams_coding_fewer_layers(
    which: str, request: pytest.FixtureRequest
) -> None:
    candidates: ResidualCandidates = request.getfixturevalue(which)
    fewer = []
    for bpp in (0.125, 0.25, 0.5, 1.0, 2.0):
        lazy, full = _fresh(candidates), _fresh(candidates)
        (found,) = select_layered([lazy], bpp)
        (reference,) = select_layered([full], bpp, exhaustive=True)
        assert found.data == reference.data, f"{which} at {bpp} bpp"
        assert found.target_met and found.n_bytes * 8 <= bpp * candidates.image.pixels.size
        assert len(lazy._layered) <= len(full._layered)
        fewer.append(len(lazy._layered) < len(full._layered))
    assert fewer[0] and fewer[1]  # the low rates need the fewest layers
    decoded = decode_image(found.data).pixels
    assert decoded.shape == candidates.image.pixels.shape


def test_the_base_descent_finds_the_base_a_full_search_finds(
    chest_candidates: ResidualCandidates,
) -> None:
    """Over every tile, ladder max error and correction, starting from the looser rung's
    base lands where trying every base lands."""
    candidates = _fresh(chest_candidates)
    for index in range(len(candidates.candidates.boxes)):
        for option in candidates._layer_options():
            for error in candidates._layer_errors(option):
                start = candidates._looser_iterations(index, error, option)
                descended = candidates._cheapest_base(index, error, option, start)
                assert descended == candidates._cheapest_base(index, error, option, None)


def test_corrections_go_under_no_layer_finer_than_their_step(
    chest_candidates: ResidualCandidates,
) -> None:
    candidates = _fresh(chest_candidates)
    errors = ladder_max_errors(candidates.image.peak)
    assert candidates._layer_errors(None) == errors
    for option in candidates._layer_options()[1:]:
        kept = candidates._layer_errors(option)
        assert kept == [error for error in errors if error >= option[1]] and 0 not in kept
    ways = candidates.ladders()[0]
    layered = ways[-len(candidates._layer_options()) :]
    lengths = [len(ladder.costs) for ladder in layered]
    expected = [len(candidates._layer_errors(o)) for o in candidates._layer_options()]
    assert lengths == expected


@pytest.mark.parametrize("max_error", [0, 2, 3, 6])
def test_max_errors_take_a_correction_where_it_is_smaller_and_keep_the_bound(
    max_error: int, chest_xray: GrayImage
) -> None:
    """From D = 3 a tile's layer may go over a coarse correction (format 6): the stream is
    smaller than with layers alone on this radiograph, and every decoded pixel is within D;
    below the corrections' step nothing changes (format 5)."""
    crop = GrayImage(np.ascontiguousarray(chest_xray.pixels[256:768, 256:768]), 8)
    candidates = ResidualCandidates.encode(crop, tile_size=256)
    plain = replace(_fresh(candidates), layer_coarse_options=(None,))
    with_corrections, alone = candidates.stream(max_error), plain.stream(max_error)
    for result in (with_corrections, alone):
        decoded = decode_image(result.data).pixels.astype(np.int64)
        assert np.abs(decoded - crop.pixels).max() <= max_error
    if max_error < 3:
        assert with_corrections.data == alone.data and with_corrections.data[4] == 5
    else:
        assert with_corrections.data[4] == 6
        assert with_corrections.n_bytes < alone.n_bytes
