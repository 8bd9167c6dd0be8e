"""Half-resolution tiles: format 3 streams, the two-ladder allocation, real codes end to end."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from codec import bitstream, resolution
from codec.bitstream import BitstreamError, Stream, StreamHeader
from codec.io import GrayImage, write_png
from codec.learned import TileCandidates, decode_image, encode_candidates
from codec.metrics import bits_per_pixel
from codec.rate import Ladder, RateControl, allocate_bytes, allocate_ladders
from codec.weights import DEFAULT_MODEL_ID
from flows.cli import app

HEADER = StreamHeader("rnnconv-test", b"\x01" * 8, 40, 70, 12, 32, 32)  # 2x3 tiles


def four_tiles() -> list[list[bytes]]:
    return [[b"a", b"bc"], [b"def"], [b"g"], [b"hi", b"j", b"k"], [b"l"], [b"mn"]]


def test_format_3_round_trips_tile_modes_and_block_stops() -> None:
    half = [True, False, False, True, False, True]
    for block_stops in (False, True):
        header = StreamHeader(**{**HEADER.__dict__, "block_stops": block_stops})
        data = bitstream.pack(Stream(header, four_tiles(), half))
        assert data[4] == bitstream.TILE_MODES_VERSION
        back = bitstream.unpack(data)
        assert back.header == header and back.tiles == four_tiles() and back.half_res == half
        kept = bitstream.unpack(bitstream.keep_iterations(data, 1))
        assert kept.half_res == half and kept.iterations() == [1] * 6


def test_streams_without_half_tiles_keep_versions_1_and_2() -> None:
    assert bitstream.pack(Stream(HEADER, four_tiles(), [False] * 6))[4] == 1
    plain = bitstream.pack(Stream(HEADER, four_tiles()))
    assert plain[4] == 1 and bitstream.unpack(plain).half_res == []


def _reseal(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with one header byte changed and the header checksum made valid again."""
    payload = sum(len(segment) for segments in four_tiles() for segment in segments)
    header = bytearray(data[: len(data) - payload - 4])
    header[offset] = value
    return bytes(header) + struct.pack("<I", zlib.crc32(header)) + data[len(data) - payload :]


def test_unknown_tile_modes_and_flags_raise_the_stream_error() -> None:
    data = bitstream.pack(Stream(HEADER, four_tiles(), [True] + [False] * 5))
    flags_at = 5
    first_mode_at = flags_at + 1 + 1 + len(HEADER.model_id) + 8 + bitstream._FIXED.size
    assert data[first_mode_at] == bitstream.HALF_RESOLUTION
    with pytest.raises(BitstreamError, match="unknown tile mode 7"):
        bitstream.unpack(_reseal(data, first_mode_at, 7))
    with pytest.raises(BitstreamError, match="unknown format flags"):
        bitstream.unpack(_reseal(data, flags_at, 0x82))


def test_halve_and_double_keep_a_smooth_ramp() -> None:
    ramp = np.add.outer(np.arange(37), np.arange(22)).astype(np.float32) / 100
    halved = resolution.halve(ramp)
    assert halved.shape == resolution.half_shape(37, 22) == (19, 11)
    assert halved[0, 0] == pytest.approx(ramp[:2, :2].mean())
    assert halved[-1, 0] == pytest.approx(ramp[36, :2].mean())  # odd row repeated
    doubled = resolution.double(torch.from_numpy(halved)[None, None])[0, 0].numpy()
    assert doubled.shape == (38, 22)
    inner = (slice(2, 34), slice(2, 20))  # away from the clamped borders
    # torch's bicubic kernel (a = -0.75) bends a ramp by up to a third of one pixel's step
    # (0.01 here): far below what the network's own error is at the rates this mode serves.
    assert np.abs(doubled[inner] - ramp[inner]).max() < 0.0035
    assert np.abs(doubled[inner].mean() - ramp[inner].mean()) < 1e-4


def test_allocation_takes_the_cheaper_ladder_where_it_removes_more_error_per_byte() -> None:
    full = Ladder([100, 100, 100], [50.0, 20.0, 5.0])
    half = Ladder([25, 25, 25], [60.0, 45.0, 40.0])  # cheap, but stops near 40
    # A small budget: the half ladder for both tiles; a large one: the full ladder.
    assert allocate_ladders([[full, half], [full, half]], 100) == [(1, 2), (1, 2)]
    assert allocate_ladders([[full, half], [full, half]], 600) == [(0, 3), (0, 3)]
    # One ladder alone is the plain greedy allocation.
    costs, errors = [[100, 100, 100]] * 2, [[50.0, 20.0, 5.0]] * 2
    assert allocate_ladders([[full], [full]], 400) == [
        (0, k) for k in allocate_bytes(costs, errors, 400)
    ]


def test_allocation_stays_within_budget_on_random_ladders() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        tiles = []
        for _ in range(int(rng.integers(1, 6))):
            ladders = []
            for _ in range(2):
                costs = [int(c) for c in rng.integers(1, 60, size=int(rng.integers(1, 6)))]
                errors = list(np.sort(rng.random(len(costs)) * 100)[::-1])
                ladders.append(Ladder(costs, errors))
            tiles.append(ladders)
        budget = int(rng.integers(1, 300))
        picks = allocate_ladders(tiles, budget)
        cheapest = sum(min(ladder.costs[0] for ladder in ladders) for ladders in tiles)
        spent = sum(sum(tiles[t][i].costs[:k]) for t, (i, k) in enumerate(picks))
        assert spent <= max(budget, cheapest)


def test_a_lone_tile_gets_the_best_point_its_budget_buys_even_off_the_hull() -> None:
    """A zarr chunk is a one-tile image: the greedy pass along the convex hull may stop short
    of the best affordable point, and the leftover pass must find it (brute force here)."""
    full = Ladder([100, 100], [10.0, 4.0])
    half = Ladder([30, 30, 30], [50.0, 30.0, 25.0])
    # The hull runs half 1, half 2, full 1: half 3 (90 bytes, error 25) lies above it. With 95
    # bytes the greedy pass stops at half 2 (60 bytes, error 30); half 3 is what 95 buys.
    assert allocate_ladders([[full, half]], 95) == [(1, 3)]
    assert allocate_ladders([[full, half]], 100) == [(0, 1)]
    rng = np.random.default_rng(11)
    for _ in range(200):
        ladders = []
        for _ in range(2):
            costs = [int(c) for c in rng.integers(1, 60, size=int(rng.integers(1, 6)))]
            errors = list(np.sort(rng.random(len(costs)) * 100)[::-1])
            ladders.append(Ladder(costs, errors))
        budget = int(rng.integers(1, 250))
        points = [
            (ladder.squared_errors[k - 1], index, k)
            for index, ladder in enumerate(ladders)
            for k in range(1, len(ladder.costs) + 1)
            if sum(ladder.costs[:k]) <= budget
        ]
        if points:
            ((index, k),) = allocate_ladders([ladders], budget)
            assert ladders[index].squared_errors[k - 1] == min(points)[0]


@pytest.fixture(scope="module")
def crop(chest_xray: GrayImage) -> GrayImage:
    return GrayImage(chest_xray.pixels[40:520, 30:510].copy(), 8)  # 480x480: 4 tiles of 256


@pytest.fixture(scope="module", params=[DEFAULT_MODEL_ID, "rnnconv-pool-v12"])
def candidates(crop: GrayImage, request: pytest.FixtureRequest) -> TileCandidates:
    """Half tiles upsampled bicubically (the default model's weights carry no filter) and by
    rnnconv-pool-v12's fitted filter (:mod:`codec.upsampler`): the decoder must reproduce what
    the encoder measured either way."""
    return encode_candidates(crop, model_id=request.param, tile_size=256, half_res=True)


def test_half_res_stream_decodes_to_what_the_encoder_measured(
    crop: GrayImage, candidates: TileCandidates
) -> None:
    pixels = candidates.header.height * candidates.header.width
    for bpp in (0.06, 0.1, 0.2):
        result = candidates.select(RateControl(bpp=bpp, half_res=True))
        assert result.target_met and bits_per_pixel(result.n_bytes, pixels) <= bpp
        decoded = decode_image(result.data)
        error = np.sum((decoded.pixels.astype(np.float64) - crop.pixels) ** 2)
        # Exactly: the encoder measures each tile decoded as readers decode it (alone, on one
        # thread), not on its batched pass, whose sums may round a rare pixel the other way.
        assert error == candidates.squared_error(result.tile_iterations, result.half_res)
        if any(result.half_res):
            assert result.data[4] == bitstream.TILE_MODES_VERSION


def test_at_a_low_rate_half_tiles_are_chosen_and_beat_full_resolution(
    candidates: TileCandidates,
) -> None:
    half = candidates.select(RateControl(bpp=0.06, half_res=True))
    full = candidates.select(RateControl(bpp=0.06))
    assert sum(half.half_res) >= 1
    assert candidates.squared_error(half.tile_iterations, half.half_res) < candidates.squared_error(
        full.tile_iterations
    )


def test_half_res_prefixes_and_regions_decode_alone(candidates: TileCandidates) -> None:
    result = candidates.select(RateControl(bpp=0.1, half_res=True))
    whole = decode_image(result.data).pixels
    region = decode_image(result.data, region=((100, 300), (200, 480))).pixels
    assert np.array_equal(region, whole[100:300, 200:480])
    assert max(result.tile_iterations) > 1
    prefix = decode_image(bitstream.keep_iterations(result.data, 1)).pixels
    assert np.array_equal(prefix, decode_image(result.data, iterations=1).pixels)
    assert not np.array_equal(prefix, whole)


def test_cli_encodes_half_res_and_info_shows_it(tmp_path: Path, chest_xray: GrayImage) -> None:
    runner = CliRunner()
    source, stream = tmp_path / "crop.png", tmp_path / "crop.rdrc"
    write_png(source, GrayImage(chest_xray.pixels[:512, :512].copy(), 8))
    args = ["encode", str(source), str(stream), "--bpp", "0.05", "--half-res", "--tile-size", "256"]
    encoded = runner.invoke(app, args)
    assert encoded.exit_code == 0, encoded.output
    assert "half-res" in encoded.output
    described = runner.invoke(app, ["info", str(stream)])
    assert "format version 3" in described.output and "half" in described.output
    refused = runner.invoke(app, ["encode", str(source), str(stream), "--half-res"])
    assert refused.exit_code == 2 and "need a bpp target" in refused.output


def test_bench_names_take_half_between_blocks_and_refine() -> None:
    from codec.learned_rd import LearnedCodec, learned_codec_names
    from codec.weights import DEFAULT_MODEL_ID

    name = DEFAULT_MODEL_ID + "+blocks+half+refine"
    assert name in learned_codec_names() and DEFAULT_MODEL_ID + "+half" in learned_codec_names()
    codec = LearnedCodec.named(name)
    assert codec.adaptive and codec.half_res and codec.refine_steps > 0
    assert codec.model_id == DEFAULT_MODEL_ID and codec.name == name
    assert not LearnedCodec.named(DEFAULT_MODEL_ID + "+blocks").half_res
