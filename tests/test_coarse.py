"""The coarse correction (format 6): exact integer interpolation, segments that round-trip or
are refused, and bpp targets on a real radiograph that buy it where it removes error."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from codec import bitstream
from codec.bitstream import BitstreamError
from codec.coarse import (
    coarse_shape,
    correction,
    decode_coarse,
    encode_coarse,
    quantize_means,
    segment_parameters,
)
from codec.entropy import EntropyCodingError
from codec.io import GrayImage
from codec.learned import decode_image
from codec.metrics import ms_ssim
from codec.near_lossless import ResidualCandidates
from codec.residual import layer_bound
from codec.tiling import tile_boxes
from flows.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def crop(chest_xray: GrayImage) -> GrayImage:
    """512x512 of a real chest radiograph: 16 tiles of 128."""
    return GrayImage(np.ascontiguousarray(chest_xray.pixels[256:768, 256:768]), 8)


@pytest.fixture(scope="module")
def candidates(crop: GrayImage) -> ResidualCandidates:
    return ResidualCandidates.for_bpp(crop, tile_size=128, half_res=True)


def _squared_error(data: bytes, image: GrayImage) -> float:
    decoded = decode_image(data).pixels.astype(np.int64)
    return float(np.sum((decoded - image.pixels) ** 2))


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_constant_indices_add_a_constant_and_a_ramp_stays_linear(factor: int) -> None:
    assert np.unique(correction(np.full((3, 4), -5), factor, 3, (40, 60))).tolist() == [-15]
    # Two blocks whose indices differ by 2 factor: between their centres (half a pixel off the
    # grid) the correction climbs 2 per pixel from 1 to 2 factor - 1, the same in every row;
    # outside them it holds each block's value.
    ramp = correction(np.array([[0, 2 * factor]]), factor, 1, (factor, 2 * factor))
    assert (ramp == ramp[0]).all() and ramp.dtype == np.int64
    middle = ramp[0, factor // 2 : factor // 2 + factor]
    assert middle[0] == 1 and middle[-1] == 2 * factor - 1
    assert np.all(np.diff(middle) == 2)
    assert (ramp[0, : factor // 2] == 0).all() and (ramp[0, -factor // 2 :] == 2 * factor).all()


@given(
    seed=st.integers(0, 2**32 - 1),
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    factor=st.sampled_from([4, 8, 16]),
    step=st.integers(1, 9),
)
@settings(max_examples=40, deadline=None)
def test_segments_round_trip_to_the_encoders_correction(
    seed: int, height: int, width: int, factor: int, step: int
) -> None:
    error = np.random.default_rng(seed).integers(-300, 300, (height, width))
    indices = quantize_means(error, factor, step)
    assert indices.shape == coarse_shape((height, width), factor)
    segment = encode_coarse(indices, factor, step)
    assert segment_parameters(segment)[:2] == (factor, step)
    decoded = decode_coarse(segment, (height, width), 255)
    assert np.array_equal(decoded, correction(indices, factor, step, (height, width)))


def test_block_means_are_what_the_indices_quantize() -> None:
    error = np.zeros((20, 20), dtype=np.int64)
    error[:8, :8] = 6  # one full block
    error[16:, 16:] = -3  # the partial corner block (4x4 pixels): its mean over them
    indices = quantize_means(error, 8, 2)
    assert indices[0, 0] == 3 and indices[2, 2] == -2 and indices[1, 1] == 0


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (b"", "empty"),
        (b"\x05\x01", "block side byte 5"),
        (b"\x03\x00", "step 0"),
        (b"\x03\x80", "malformed coarse quantization step"),
        (b"\x03\x01", "residual segment truncated"),
    ],
)
def test_malformed_segments_raise_the_entropy_error(segment: bytes, message: str) -> None:
    with pytest.raises(EntropyCodingError, match=message):
        decode_coarse(segment, (64, 64), 255)


def test_a_step_beyond_the_pixel_range_is_refused() -> None:
    segment = encode_coarse(np.zeros((2, 2), dtype=np.int64), 8, 300)
    with pytest.raises(EntropyCodingError, match="step 300"):
        decode_coarse(segment, (16, 16), 255)
    with pytest.raises(ValueError, match="block side"):
        encode_coarse(np.zeros((2, 2), dtype=np.int64), 2, 1)


def test_low_rate_targets_buy_corrections_that_remove_error(
    candidates: ResidualCandidates, crop: GrayImage
) -> None:
    """At 0.1 bpp on a real radiograph some tiles take a coarse correction: the stream is
    format 6, fits, decodes (every corrected tile's pixel checksum verified), leaves less
    error and a higher MS-SSIM than the same stream without its corrections, and no more
    error than the allocation offered none."""
    without_options = replace(
        candidates,
        coarse_options=(),
        layer_coarse_options=(None,),
        _layered={},
        _coarse={},
        _corrections={},
    )
    for bpp in (0.1, 0.15):
        result = candidates.at_bpp(bpp)
        assert result.target_met and result.n_bytes * 8 <= bpp * crop.pixels.size
        assert result.data[4] == bitstream.COARSE_VERSION
        stream = bitstream.unpack(result.data)
        corrected = [i for i in range(len(stream.tiles)) if stream.coarse_segment(i)]
        assert corrected
        stripped = bitstream.pack(replace(stream, coarse=[]))
        assert _squared_error(result.data, crop) < _squared_error(stripped, crop)
        with_corrections = ms_ssim(crop.pixels, decode_image(result.data).pixels, 8)
        assert with_corrections > ms_ssim(crop.pixels, decode_image(stripped).pixels, 8)
        plain = without_options.at_bpp(bpp)
        assert plain.data[4] != bitstream.COARSE_VERSION
        assert _squared_error(result.data, crop) <= 1.02 * _squared_error(plain.data, crop)


def test_a_correction_under_a_layer_keeps_the_layers_bound(
    candidates: ResidualCandidates, crop: GrayImage
) -> None:
    """Where a layered tile also carries a coarse correction, the layer codes what the
    corrected pixels leave: every pixel stays within the tile's bound. (Candidates offered
    only layers over corrections, so that every layered tile has one.)"""
    corrected_layers = replace(
        candidates,
        coarse_options=(),
        layer_coarse_options=((8, 2),),
        _layered={},
        _coarse={},
        _corrections={},
    )
    checked = 0
    for bpp in (0.6, 1.5):
        data = corrected_layers.at_bpp(bpp).data
        stream = bitstream.unpack(data)
        decoded = decode_image(data).pixels.astype(np.int64)
        for index, box in enumerate(tile_boxes(*crop.pixels.shape, 128)):
            layer = stream.residual(index)
            if layer is None or stream.coarse_segment(index) is None:
                continue
            bound = layer_bound(layer[0], layer[1], stream.residual_coder)
            error = np.abs(decoded[box.slices] - crop.pixels[box.slices])
            assert error.max() <= bound
            checked += 1
    assert checked


def test_prefixes_drop_corrections_regions_decode_alone_and_checksums_hold(
    candidates: ResidualCandidates,
) -> None:
    data = candidates.at_bpp(0.1).data
    whole = decode_image(data).pixels
    region = decode_image(data, region=((100, 300), (120, 400))).pixels
    assert np.array_equal(region, whole[100:300, 120:400])

    stream = bitstream.unpack(data)
    first = bitstream.unpack(bitstream.keep_iterations(data, 1))
    for index, segments in enumerate(stream.tiles):
        kept = first.coarse_segment(index) if first.coarse else None
        assert kept == (stream.coarse_segment(index) if len(segments) <= 1 else None)
    assert decode_image(bitstream.keep_iterations(data, 1)).pixels.shape == whole.shape

    tile = next(i for i in range(len(stream.tiles)) if stream.coarse_segment(i))
    crcs = list(stream.pixel_crcs)
    crcs[tile] ^= 1
    with pytest.raises(BitstreamError, match=f"tile {tile} decodes to other pixels"):
        decode_image(bitstream.pack(replace(stream, pixel_crcs=crcs)))
    corrupt = bytearray(data)
    corrupt[-1] ^= 0x40  # the payload's last tile
    with pytest.raises(BitstreamError, match="checksum mismatch"):
        decode_image(bytes(corrupt))


def test_info_reports_the_corrections(candidates: ResidualCandidates, tmp_path: Path) -> None:
    path = tmp_path / "coarse.rdrc"
    data = candidates.at_bpp(0.1).data
    path.write_bytes(data)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    stream = bitstream.unpack(data)
    count = sum(1 for i in range(len(stream.tiles)) if stream.coarse_segment(i))
    assert "format version 6" in result.output
    assert f"coarse correction on {count} of 16 tiles" in result.output
    assert "coarse bytes" in result.output


@pytest.fixture(scope="module")
def corrected_seed() -> bytes:
    from storage.fuzz import _coarse_seed

    (seed,) = _coarse_seed()
    return seed


def test_the_fuzzers_format_6_seed_holds_corrections(corrected_seed: bytes) -> None:
    stream = bitstream.unpack(corrected_seed)
    assert corrected_seed[4] == bitstream.COARSE_VERSION
    assert any(stream.coarse_segment(i) for i in range(len(stream.tiles)))


@given(data=st.data())
@settings(max_examples=30, deadline=None)
def test_resealed_format_6_streams_decode_or_raise_the_stream_error(
    corrected_seed: bytes, data: st.DataObject
) -> None:
    """Coarse segments, residuals and headers changed with every checksum made valid again:
    the decoder returns the declared geometry or raises BitstreamError, nothing else."""
    from storage.fuzz import check_stream, resealed_streams

    assert check_stream(data.draw(resealed_streams([corrected_seed]))) in ("decoded", "refused")


def test_deeper_images_are_offered_steps_in_8_bit_levels_too(data_dir: Path) -> None:
    """A 10-bit radiograph's network error is four times an 8-bit one's in its own levels:
    its candidates weigh steps of 1-3 levels and of 4-12; the stream fits and decodes."""
    from storage.dicom import read_dicom

    ten_bit = read_dicom(data_dir / "CR-MONO1-10-chest.dcm").image
    layered = ResidualCandidates.for_bpp(ten_bit, tile_size=256)
    steps = {step for _, step, _ in layered._coarse_ways()}
    assert steps == {1, 2, 3, 4, 8, 12}
    assert {option[1] for option in layered._layer_options() if option} == {3, 12}
    result = layered.at_bpp(0.25)
    assert result.target_met and result.n_bytes * 8 <= 0.25 * ten_bit.pixels.size
    assert decode_image(result.data).pixels.shape == ten_bit.pixels.shape
