"""The residual layer: exact index coding, the max-error bound and lossless decoding on real
radiographs, format 5 streams (prefixes, regions, corruption) and the format 4 streams written
before them, bpp search, CLI and bench."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from codec import bitstream
from codec.bitstream import BitstreamError
from codec.chunk import decode_chunk, encode_chunks, parse_envelope
from codec.entropy import EntropyCodingError
from codec.io import GrayImage, read_png
from codec.learned import decode_image, encode_candidates, encode_image
from codec.learned_rd import LayeredCodec, learned_codec, learned_codec_names
from codec.metrics import bits_per_pixel, psnr
from codec.near_lossless import ResidualCandidates, ladder_max_errors
from codec.numcodecs_codec import RadiarcCodec
from codec.rate import RateControl
from codec.residual import (
    CODERS,
    MAX_INDEX,
    decode_residual,
    encode_residual,
    layer_bound,
    quantize,
    reconstruct,
    smoothed,
)
from codec.weights import DEFAULT_MODEL_ID
from codec.zarr_codec import RadiarcZarrCodec
from flows.cli import app
from storage.dicom import read_dicom

runner = CliRunner()


@pytest.fixture(scope="module")
def odd_crop(chest_xray: GrayImage) -> GrayImage:
    """A 150x230 crop: with 64-pixel tiles, edge tiles of 22 and 38 pixels."""
    return GrayImage(np.ascontiguousarray(chest_xray.pixels[500:650, 300:530]), 8)


@pytest.fixture(scope="module")
def ten_bit(data_dir: Path) -> GrayImage:
    """The real 10-bit CR chest (MONOCHROME1), 440x440."""
    return read_dicom(data_dir / "CR-MONO1-10-chest.dcm").image


@pytest.fixture(scope="module")
def layered_10bit(ten_bit: GrayImage) -> ResidualCandidates:
    return ResidualCandidates.encode(ten_bit, tile_size=128)


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize(
    ("shape", "scale"),
    [((64, 64), 2.0), ((37, 100), 400.0), ((1, 1), 0.0), ((3, 5), 0.0), ((40, 40), 30000.0)],
)
def test_indices_round_trip_exactly(shape: tuple[int, int], scale: float, coder: int) -> None:
    rng = np.random.default_rng(int(scale) + shape[0])
    indices = np.clip(np.rint(rng.laplace(0, scale or 1e-9, shape)), -MAX_INDEX, MAX_INDEX)
    indices = indices.astype(np.int64)
    coded = encode_residual(indices, coder)
    assert np.array_equal(decode_residual(coded, shape, coder), indices)


@pytest.mark.parametrize("coder", CODERS)
def test_extreme_indices_round_trip_and_larger_ones_are_refused(coder: int) -> None:
    """Full-scale jumps, where coder 2's cubic overshoots the range of indices."""
    indices = np.array([[MAX_INDEX, -MAX_INDEX, 0], [1, -1, 65535]], dtype=np.int64)
    assert np.array_equal(decode_residual(encode_residual(indices, coder), (2, 3), coder), indices)
    stripes = np.where(np.arange(48)[:, None] % 6 < 3, MAX_INDEX, -MAX_INDEX) * np.ones((1, 40))
    stripes = stripes.astype(np.int64)
    assert np.array_equal(
        decode_residual(encode_residual(stripes, coder), stripes.shape, coder), stripes
    )
    with pytest.raises(ValueError, match="within"):
        encode_residual(indices + MAX_INDEX, coder)
    with pytest.raises(ValueError, match="unknown residual coder"):
        encode_residual(indices, 3)


@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    coder=st.sampled_from(CODERS),
    scale=st.sampled_from([0, 1, 7, 255, MAX_INDEX]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_any_indices_round_trip_exactly(
    shape: tuple[int, int], coder: int, scale: int, seed: int
) -> None:
    indices = np.random.default_rng(seed).integers(-scale, scale + 1, shape)
    assert np.array_equal(decode_residual(encode_residual(indices, coder), shape, coder), indices)


def test_coder_2_codes_a_real_radiograph_losslessly_in_fewer_bytes(
    chest_xray: GrayImage,
) -> None:
    """Stream format 5's coder against format 4's on real pixels (a 512x512 tile of a chest
    X-ray, coded on its own: the lossless case), real byte counts: at least 3% smaller."""
    tile = chest_xray.pixels[256:768, 256:768].astype(np.int64) - 128
    sizes = {}
    for coder in CODERS:
        coded = encode_residual(tile, coder)
        assert np.array_equal(decode_residual(coded, tile.shape, coder), tile)
        sizes[coder] = len(coded)
    assert sizes[2] < 0.97 * sizes[1], sizes


#: Format 4 streams (residual coder 1) written before format 5, of rows 400-463 and columns
#: 300-427 of tests/data/00004934_000.png in two 64-pixel tiles, and the SHA-256 of the pixels
#: they decoded to then: D = 1 with no network iterations, D = 4 on three.
FORMAT_4_FIXTURES = {
    "residual-v4.rdrc": (1, "50bc1ffa99e3afd2f1c379f72ded6163495b620a52dd1bbc3faa1efb73cfae8e"),
    "residual-v4-d4.rdrc": (4, "2332761d543a841679eaaa07e84a5edc8c260769cbcf037821eb6ec8c3bfdb16"),
}


@pytest.mark.parametrize("name", sorted(FORMAT_4_FIXTURES))
def test_format_4_streams_still_decode_to_the_same_pixels(name: str, data_dir: Path) -> None:
    data = (Path(__file__).parent / "fixtures" / name).read_bytes()
    max_error, digest = FORMAT_4_FIXTURES[name]
    assert data[4] == bitstream.RESIDUAL_VERSION
    assert bitstream.unpack(data).residual_coder == 1
    decoded = decode_image(data).pixels
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == digest
    original = read_png(data_dir / "00004934_000.png").pixels[400:464, 300:428].astype(np.int64)
    assert np.abs(decoded.astype(np.int64) - original).max() <= max_error
    # Rewritten (all iterations kept), it stays format 4: its segments are coder 1's.
    iterations = max(bitstream.unpack(data).iterations()) or 1
    kept = bitstream.keep_iterations(data, iterations)
    assert kept[4] == bitstream.RESIDUAL_VERSION
    assert np.array_equal(decode_image(kept).pixels, decoded)


def test_coding_cost_tracks_the_entropy_of_the_indices() -> None:
    """Laplacian indices of scale 3 cost about their entropy (~4.0 bits), not 16 bits each."""
    indices = np.rint(np.random.default_rng(1).laplace(0, 3.0, (256, 256))).astype(np.int64)
    _, counts = np.unique(indices, return_counts=True)
    entropy = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    bits = len(encode_residual(indices)) * 8 / indices.size
    assert entropy < bits < entropy + 0.15, (entropy, bits)


@pytest.mark.parametrize("max_error", [0, 1, 7, 300])
def test_quantization_never_exceeds_the_max_error(max_error: int) -> None:
    rng = np.random.default_rng(max_error)
    original = rng.integers(0, 1024, (50, 60))
    base = np.clip(original + rng.integers(-700, 700, original.shape), 0, 1023).astype(np.uint16)
    indices = quantize(original - base.astype(np.int64), max_error)
    restored = reconstruct(base, indices, max_error, 1023)
    assert np.abs(restored.astype(np.int64) - original).max() <= max_error
    assert restored.dtype == np.uint16 and restored.max() <= 1023


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), coder=st.sampled_from(CODERS))
def test_random_bytes_raise_only_the_entropy_error(data: bytes, coder: int) -> None:
    try:
        indices = decode_residual(data, (9, 13), coder)
    except EntropyCodingError:
        return
    assert indices.shape == (9, 13) and np.abs(indices).max() <= MAX_INDEX


@pytest.mark.parametrize("coder", CODERS)
def test_truncated_or_extended_segments_are_refused(coder: int) -> None:
    indices = np.rint(np.random.default_rng(2).laplace(0, 5.0, (32, 32))).astype(np.int64)
    segment = encode_residual(indices, coder)
    for broken in (segment[:-1], segment[: len(segment) // 2], segment + b"\x00"):
        with pytest.raises(EntropyCodingError):
            decode_residual(broken, (32, 32), coder)


def test_lossless_on_a_real_8_bit_radiograph(odd_crop: GrayImage) -> None:
    result = encode_image(odd_crop, RateControl(max_error=0), tile_size=64)
    assert result.data[4] == bitstream.RESIDUAL_CODER_2_VERSION and result.max_error == 0
    assert np.array_equal(decode_image(result.data).pixels, odd_crop.pixels)
    # Smaller than the raw pixels: the network's prediction and the layer's coding both work.
    assert bits_per_pixel(result.n_bytes, odd_crop.pixels.size) < 6.0


def test_max_error_bounds_every_pixel_of_a_real_10_bit_dicom(
    ten_bit: GrayImage, layered_10bit: ResidualCandidates
) -> None:
    lossless = layered_10bit.stream(0)
    assert np.array_equal(decode_image(lossless.data).pixels, ten_bit.pixels)
    previous = lossless.n_bytes
    for max_error in (1, 4, 16):
        result = layered_10bit.stream(max_error)
        decoded = decode_image(result.data).pixels.astype(np.int64)
        assert np.abs(decoded - ten_bit.pixels).max() <= max_error
        assert result.n_bytes < previous  # a looser bound costs fewer real bytes
        previous = result.n_bytes


def test_prefixes_drop_the_layer_and_regions_decode_alone(ten_bit: GrayImage) -> None:
    result = ResidualCandidates.encode(ten_bit, tile_size=128, base_iterations=(3,)).stream(2)
    full = decode_image(result.data).pixels
    region = ((100, 300), (50, 260))
    alone = decode_image(result.data, region=region).pixels
    assert np.array_equal(alone, full[100:300, 50:260])
    # One iteration: every tile coded with more loses its layer, so the bound no longer holds.
    assert result.tile_iterations == [3] * 16
    prefix = bitstream.keep_iterations(result.data, 1)
    assert bitstream.unpack(prefix).residuals == [] and prefix[4] == bitstream.FORMAT_VERSION
    assert np.array_equal(decode_image(prefix).pixels, decode_image(result.data, 1).pixels)
    assert np.abs(decode_image(prefix).pixels.astype(np.int64) - ten_bit.pixels).max() > 2
    # Keeping every iteration keeps the layer and the stream.
    assert bitstream.keep_iterations(result.data, max(result.tile_iterations)) == result.data


def test_a_corrupt_layer_is_caught_by_the_tile_checksum(layered_10bit: ResidualCandidates) -> None:
    data = bytearray(layered_10bit.stream(3).data)
    data[-5] ^= 0x10  # in the last tile's residual segment
    with pytest.raises(BitstreamError, match="checksum"):
        decode_image(bytes(data))
    with pytest.raises(BitstreamError, match=r"truncated|payload"):
        decode_image(bytes(data[:-7]))


def _squared_error(data: bytes, image: GrayImage) -> float:
    return float(np.sum((decode_image(data).pixels.astype(np.float64) - image.pixels) ** 2))


def test_bpp_target_mixes_network_and_layers_better_than_either_alone(
    ten_bit: GrayImage,
) -> None:
    """Each tile is coded by the network alone or with a residual layer, whichever its bytes
    buy more with: on real bytes and decoded pixels the mix fits the budget and leaves no more
    error than the network alone or one max error for every tile (within the greedy
    allocation's slack)."""
    layered = ResidualCandidates.for_bpp(ten_bit, tile_size=128)
    network = encode_candidates(ten_bit, None, tile_size=128)
    errors = ladder_max_errors(ten_bit.peak)
    for bpp in (0.5, 1.5, 3.0):
        budget = bpp * ten_bit.pixels.size / 8
        mixed = layered.at_bpp(bpp)
        assert mixed.target_met and mixed.n_bytes <= budget
        alone = network.select(RateControl(bpp=bpp))
        uniform = [layered.stream(e) for e in errors if layered.stream(e).n_bytes <= budget]
        rivals = [_squared_error(alone.data, ten_bit)] if alone.target_met else []
        rivals += [_squared_error(uniform[-1].data, ten_bit)] if uniform else []
        assert rivals and _squared_error(mixed.data, ten_bit) <= 1.02 * min(rivals)
    high = layered.at_bpp(3.0)
    assert high.max_error is not None  # every tile has a layer this high
    assert np.abs(decode_image(high.data).pixels.astype(np.int64) - ten_bit.pixels).max() <= (
        high.max_error
    )
    assert not layered.at_bpp(0.01).target_met


@pytest.mark.parametrize("max_error", [0, 1, 4, 31])
def test_smoothing_stays_within_twice_the_bound(max_error: int, chest_xray: GrayImage) -> None:
    """The smoothed reconstruction stays in each pixel's bin: within 2D of the original (D at
    D = 0: lossless stays lossless), on a real radiograph against a blurred base."""
    original = chest_xray.pixels[200:328, 300:428].astype(np.int64)
    base = np.clip(
        original + np.random.default_rng(max_error).integers(-40, 41, (128, 128)), 0, 255
    )
    base = base.astype(np.uint8)
    indices = quantize(original - base, max_error)
    smooth = reconstruct(base, indices, max_error, 255, smooth=True)
    assert np.abs(smooth.astype(np.int64) - original).max() <= 2 * max_error
    if max_error == 0:
        assert np.array_equal(smooth, original)


def test_a_smoothed_layer_says_so_and_decodes_to_its_encoders_pixels(
    odd_crop: GrayImage, tmp_path: Path
) -> None:
    """bpp targets smooth a layered tile where that removes squared error: the flag is in the
    segment (coder 2 only), the reader smooths too (the pixel checksum would stop it
    otherwise), the tile's error is below the unsmoothed layer's on decoded pixels, and every
    pixel is within the bound ``radiarc info`` and the result report."""
    with pytest.raises(ValueError, match="no smoothing"):
        encode_residual(np.zeros((4, 4), dtype=np.int64), coder=1, smooth=True)
    layered = ResidualCandidates.for_bpp(odd_crop, tile_size=64)
    plain, smoothed_tile = layered._tile(0, 8), layered._tile(0, 8, smoothing=True)
    assert smoothed_tile.smoothed and not plain.smoothed  # measured: it pays on this tile
    assert smoothed_tile.squared_error < plain.squared_error
    assert smoothed_tile.bound == 16 and layer_bound(smoothed_tile.residual, 8, 2) == 16
    assert smoothed(smoothed_tile.residual, 2) and not smoothed(smoothed_tile.residual, 1)
    high = layered.at_bpp(2.0)
    stream = bitstream.unpack(high.data)
    layers = [stream.residual(i) for i in range(len(stream.tiles))]
    assert any(layer and smoothed(layer[0], 2) for layer in layers)
    decoded = decode_image(high.data).pixels.astype(np.int64)
    assert high.max_error is not None
    assert np.abs(decoded - odd_crop.pixels).max() <= high.max_error
    for index, layer in enumerate(layers):
        assert layer is not None
        box = layered.candidates.boxes[index]
        tile_error = np.abs(decoded[box.slices] - odd_crop.pixels[box.slices]).max()
        assert tile_error <= layer_bound(layer[0], layer[1], 2)
    path = tmp_path / "smoothed.rdrc"
    path.write_bytes(high.data)
    described = runner.invoke(app, ["info", str(path)])
    assert described.exit_code == 0 and "smoothed)" in described.output


def test_rate_control_accepts_the_modes_alone() -> None:
    assert RateControl(max_error=0).describe() == "lossless"
    assert RateControl(bpp=2.0, residual=True).describe() == "bpp<=2 residual"
    for wrong in (
        {"max_error": 2, "bpp": 1.0},
        {"max_error": -1},
        {"iterations": 3, "residual": True},
        {"bpp": 1.0, "residual": True, "adaptive": True},
        {"max_error": 1, "residual": True},
    ):
        with pytest.raises(ValueError):
            RateControl(**wrong)  # type: ignore[arg-type]


def test_cli_lossless_round_trip_and_info(tmp_path: Path, data_dir: Path) -> None:
    stream, output = tmp_path / "mono1.rdrc", tmp_path / "mono1.png"
    source = data_dir / "CR-MONO1-10-chest.dcm"
    encoded = runner.invoke(app, ["encode", str(source), str(stream), "--max-error", "0"])
    assert encoded.exit_code == 0, encoded.output
    assert runner.invoke(app, ["decode", str(stream), str(output)]).exit_code == 0
    assert np.array_equal(read_png(output, bits_stored=10).pixels, read_dicom(source).image.pixels)
    described = runner.invoke(app, ["info", str(stream)])
    assert "format version 5" in described.output
    assert "residual layer on 1 of 1 tiles: lossless" in described.output
    refused = runner.invoke(app, ["encode", str(source), str(stream), "--residual"])
    assert refused.exit_code == 2 and "residual" in refused.output


def test_bench_codec_meets_high_rates(ten_bit: GrayImage) -> None:
    name = DEFAULT_MODEL_ID + "+residual"
    assert name in learned_codec_names()
    codec = learned_codec(name)
    assert isinstance(codec, LayeredCodec)
    codec.tile_size = 128
    data, max_error = codec.encode_at_bpp(ten_bit, 3.0)
    assert bits_per_pixel(len(data), ten_bit.pixels.size) <= 3.0
    decoded = codec.decode(data, ten_bit.pixels.shape, 10)
    assert np.abs(decoded.astype(np.int64) - ten_bit.pixels).max() <= max_error
    assert np.array_equal(
        codec.decode(codec.encode_lossless(ten_bit), (440, 440), 10), ten_bit.pixels
    )


def test_lossless_chunks_read_back_exactly_with_plain_zarr(
    chest_xray: GrayImage, tmp_path: Path
) -> None:
    """``max_error`` in the codec config (written even when 0): every chunk is a format 5
    stream, the actors' batch path codes the same bytes, and ``zarr.open`` reads the pixels
    back exactly (0) or within the bound (2)."""
    pixels = chest_xray.pixels[300:492, 200:392].copy()  # 2x2 chunks of 96
    for max_error in (0, 2):
        codec = RadiarcCodec(max_error=max_error)
        assert codec.get_config()["max_error"] == max_error
        assert RadiarcCodec.from_config(codec.get_config()) == codec
        chunks = [pixels[:96, :96].copy(), pixels[96:, 96:].copy()]
        streams = [codec.encode(chunk) for chunk in chunks]
        assert all(parse_envelope(s)[1][4] == bitstream.RESIDUAL_CODER_2_VERSION for s in streams)
        batched = encode_chunks(chunks, [codec.settings] * 2, images=[0, 0])
        assert [encoded.data for encoded in batched] == streams

        store = tmp_path / f"max-error-{max_error}.zarr"
        array = zarr.create_array(
            store,
            shape=pixels.shape,
            chunks=(96, 96),
            dtype=np.uint8,
            serializer=RadiarcZarrCodec(max_error=max_error),
        )
        array[:] = pixels
        read = zarr.open_array(store, mode="r")[:]
        assert np.abs(read.astype(np.int64) - pixels).max() <= max_error
        assert max_error or np.array_equal(read, pixels)
    assert "max_error" not in RadiarcCodec(iterations=3).get_config()  # older configs unchanged


def test_a_reader_whose_network_decodes_differently_is_stopped(
    layered_10bit: ResidualCandidates,
) -> None:
    """Each layered tile records the CRC-32 of the pixels its encoder decoded. A reader whose
    network arithmetic differs (other oneDNN kernels) gets other base pixels: it must refuse
    rather than return pixels off the bound. Stood in for by a stream whose record differs."""
    stream = bitstream.unpack(layered_10bit.stream(0).data)
    crcs = list(stream.pixel_crcs)
    crcs[5] ^= 1
    other = bitstream.pack(replace(stream, pixel_crcs=crcs))
    with pytest.raises(BitstreamError, match="tile 5 decodes to other pixels"):
        decode_image(other)
    assert decode_image(other, region=((0, 100), (0, 100))).pixels.shape == (100, 100)


def test_residual_chunks_share_an_image_budget_and_read_back_with_plain_zarr(
    chest_xray: GrayImage, tmp_path: Path
) -> None:
    """``residual`` in the codec config: plain zarr budgets each chunk alone; the actors' path
    (chunks grouped by image) shares the image's budget among its chunks, and both fit."""
    pixels = chest_xray.pixels[300:492, 200:392].copy()
    codec = RadiarcCodec(bpp=1.0, residual=True)
    assert codec.get_config()["residual"] is True
    assert RadiarcCodec.from_config(codec.get_config()) == codec
    chunks = [pixels[:96, :96].copy(), pixels[:96, 96:].copy(), pixels[96:, :].copy()]
    alone = [codec.encode(chunk) for chunk in chunks]
    assert all(
        len(parse_envelope(s)[1]) * 8 <= 1.0 * c.size for s, c in zip(alone, chunks, strict=True)
    )
    assert [e.data for e in encode_chunks(chunks, [codec.settings] * 3)] == alone
    shared = encode_chunks(chunks, [codec.settings] * 3, images=[0, 0, 0])
    coded = sum(len(parse_envelope(e.data)[1]) for e in shared)
    assert all(e.target_met for e in shared) and coded * 8 <= 1.0 * pixels.size

    store = tmp_path / "residual.zarr"
    array = zarr.create_array(
        store,
        shape=pixels.shape,
        chunks=(96, 96),
        dtype=np.uint8,
        serializer=RadiarcZarrCodec(bpp=1.0, residual=True),
    )
    array[:] = pixels
    read = zarr.open_array(store, mode="r")[:]
    assert np.array_equal(read[:96, :96], decode_chunk(alone[0]))
    assert psnr(pixels, read, 8) > 44  # the network alone reaches ~41 dB at 1 bpp


def test_tiles_the_layer_codes_alone_and_tiles_with_nothing(odd_crop: GrayImage) -> None:
    """Lossless, the layer alone (no network iterations, mid-grey base) codes a radiograph in
    fewer bytes than on the network's first iteration, and the encoder finds that; a tile with
    neither iterations nor a layer is refused."""
    alone = ResidualCandidates.encode(odd_crop, tile_size=64, base_iterations=(0,)).stream(0)
    on_network = ResidualCandidates.encode(odd_crop, tile_size=64, base_iterations=(1,)).stream(0)
    chosen = encode_image(odd_crop, RateControl(max_error=0), tile_size=64)
    assert alone.n_bytes < on_network.n_bytes and chosen.n_bytes <= alone.n_bytes
    assert 0 in chosen.tile_iterations
    for result in (alone, chosen):
        assert np.array_equal(decode_image(result.data).pixels, odd_crop.pixels)
    # A prefix keeps the layer of a tile that has no iterations to drop.
    assert np.array_equal(
        decode_image(bitstream.keep_iterations(alone.data, 1)).pixels, odd_crop.pixels
    )
    stream = bitstream.unpack(alone.data)
    empty = replace(stream, residuals=[b""] * len(stream.tiles))
    with pytest.raises(BitstreamError, match="no iterations and no residual layer"):
        decode_image(bitstream.pack(empty))


def test_half_resolution_tiles_join_the_mix(chest_xray: GrayImage) -> None:
    """``+half+residual``: a tile may also be coded at half resolution by the network alone;
    streams mixing half tiles and layered tiles decode (whole or by region), fit, and leave no
    more error than the mix without halves."""
    crop = GrayImage(np.ascontiguousarray(chest_xray.pixels[256:768, 256:768]), 8)
    with_halves = ResidualCandidates.for_bpp(crop, tile_size=128, half_res=True)
    without = ResidualCandidates.for_bpp(crop, tile_size=128)
    for bpp in (0.1, 0.5):
        mixed, plain = with_halves.at_bpp(bpp), without.at_bpp(bpp)
        assert mixed.target_met and mixed.n_bytes * 8 <= bpp * crop.pixels.size
        assert any(mixed.half_res)
        decoded = decode_image(mixed.data).pixels
        assert _squared_error(mixed.data, crop) <= 1.02 * _squared_error(plain.data, crop)
        region = decode_image(mixed.data, region=((100, 300), (120, 260))).pixels
        assert np.array_equal(region, decoded[100:300, 120:260])
    assert learned_codec(DEFAULT_MODEL_ID + "+half+residual").name.endswith("+half+residual")


def test_near_lossless_benchmark_prints_a_checked_row(odd_crop: GrayImage) -> None:
    from codec.bench.near_lossless import image_row

    row = image_row("crop", odd_crop, [0, 2], DEFAULT_MODEL_ID)
    ours_lossless, jpegls_lossless, ours_near, jpegls_near, j2k, jxl = map(float, row[2:])
    assert ours_near < ours_lossless and jpegls_near < jpegls_lossless
    assert min(j2k, jxl) > 0 and ours_lossless < 8.0
