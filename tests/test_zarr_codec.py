"""The learned codec inside zarr: numcodecs (v2 arrays), zarr v3 and sharded v3 arrays.

Readers use plain zarr: a fresh interpreter that imports only zarr and numpy reads arrays written
here, from a local store and from S3 (moto's server on 127.0.0.1), the codec found through
entry points alone. Quality is checked relative to the direct codec (``encode_image`` /
``decode_image`` on the same chunk), never as absolute numbers: the shipped weights change.

Backwards-compatibility fixtures live in ``tests/fixtures/zarr/``: small arrays (v2, v3, sharded
v3; 8-bit and 12-bit) written once, each with the pixels it decoded to (``<name>.npy``); every
later version must decode them within one grey level. Streams name the weights that wrote them,
so after the shipped weights are replaced the fixtures are refused (by design). Regenerate them
on purpose, then commit ``tests/fixtures/zarr/``:

    GENERATE_EXPECTED=1 pytest tests/test_zarr_codec.py -k fixtures
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import s3fs
import torch
import zarr
from zarr.registry import get_codec_class

import codec.numcodecs_codec
import codec.zarr_codec
from codec import bitstream
from codec.bitstream import BitstreamError, Stream
from codec.chunk import (
    CODEC_ID,
    content_extent,
    decode_chunk,
    encode_chunk,
    encode_chunks,
    parse_envelope,
)
from codec.io import GrayImage
from codec.learned import decode_image, encode_image
from codec.metrics import psnr
from codec.numcodecs_codec import RadiarcCodec
from codec.rate import RateControl
from codec.tiling import tile_boxes
from codec.weights import UnknownModelError, installed_models
from codec.zarr_codec import RadiarcZarrCodec

FIXTURES = Path(__file__).parent / "fixtures" / "zarr"
ITERATIONS = 2
CHUNKS = (48, 48)
ENVELOPE_BYTES = 20  # chunk envelope version 2: 16 bytes of fields + CRC-32


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """These tiles are tiny; on a shared 2-core machine one thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source_8bit(chest_xray: GrayImage) -> GrayImage:
    """100x120 (edge chunks on both axes) with a black band filling the last rows of the
    first chunk row: interior rows equal to the fill value, as an X-ray's border would be."""
    pixels = chest_xray.pixels[380:480, 300:420].copy()
    pixels[40:48, :] = 0
    return GrayImage(pixels, 8)


@pytest.fixture(scope="module")
def source_12bit(xray_12bit: GrayImage) -> GrayImage:
    return GrayImage(xray_12bit.pixels[:100, :120].copy(), 12)


def direct_decode(image: GrayImage, chunks: tuple[int, int]) -> np.ndarray:
    """What the codec gives chunk by chunk without zarr: the reference for quality."""
    out = np.zeros_like(image.pixels)
    for box in tile_boxes(*image.pixels.shape, chunks[0]):
        block = GrayImage(np.ascontiguousarray(image.pixels[box.slices]), image.bits_stored)
        data = encode_image(block, RateControl(iterations=ITERATIONS), tile_size=512).data
        out[box.slices] = decode_image(data).pixels
    return out


def write_array(
    store: Path | str, image: GrayImage, layout: str, chunks: tuple[int, int] = CHUNKS
) -> zarr.Array:
    """``image`` as a zarr array in ``layout``: "v2", "v3" or "sharded" (v3)."""
    dtype = image.pixels.dtype
    common: dict[str, Any] = {"shape": image.pixels.shape, "chunks": chunks, "dtype": dtype}
    if layout == "v2":
        compressor = RadiarcCodec(bits_stored=image.bits_stored, iterations=ITERATIONS)
        array = zarr.create_array(
            store, zarr_format=2, compressors=compressor, filters=None, fill_value=0, **common
        )
    else:
        serializer = RadiarcZarrCodec(bits_stored=image.bits_stored, iterations=ITERATIONS)
        shards = (2 * chunks[0], 2 * chunks[1]) if layout == "sharded" else None
        array = zarr.create_array(
            store, serializer=serializer, compressors=None, shards=shards, fill_value=0, **common
        )
    array[:] = image.pixels
    return array


LAYOUTS = ("v2", "v3", "sharded")


@pytest.fixture(scope="module")
def written(
    tmp_path_factory: pytest.TempPathFactory, source_8bit: GrayImage, source_12bit: GrayImage
) -> dict[str, tuple[Path, GrayImage]]:
    """Arrays in every layout (8-bit), plus a 12-bit v3 one: name -> (path, source)."""
    root = tmp_path_factory.mktemp("arrays")
    arrays = {layout: (root / f"{layout}.zarr", source_8bit) for layout in LAYOUTS}
    arrays["v3_12bit"] = (root / "v3_12bit.zarr", source_12bit)
    for name, (path, image) in arrays.items():
        write_array(path, image, name.split("_")[0])
    return arrays


# --- numcodecs-style checks ------------------------------------------------------------------


def test_config_is_plain_json_and_round_trips() -> None:
    codec = RadiarcCodec(bits_stored=12, min_psnr=40.0)
    config = json.loads(json.dumps(codec.get_config()))
    assert config["id"] == CODEC_ID == "radiarc.rnnconv"
    assert config["model_id"] in installed_models() and len(config["weights_hash"]) == 16
    assert config["min_psnr"] == 40.0 and "iterations" not in config
    assert RadiarcCodec.from_config(config) == codec
    assert numcodecs.get_codec(config) == codec  # the numcodecs registry finds it
    rebuilt = eval(repr(codec), {"RadiarcCodec": RadiarcCodec})
    assert rebuilt == codec and repr(rebuilt) == repr(codec)


def test_zarr_v3_codec_round_trips_its_metadata() -> None:
    codec = RadiarcZarrCodec(iterations=3)
    assert get_codec_class(CODEC_ID) is RadiarcZarrCodec
    as_json = json.loads(json.dumps(codec.to_dict()))
    assert as_json["name"] == CODEC_ID
    assert RadiarcZarrCodec.from_dict(as_json) == codec
    assert as_json["configuration"] == {
        k: v for k, v in RadiarcCodec(iterations=3).get_config().items() if k != "id"
    }


def test_register_codecs_registers_both_without_entry_points() -> None:
    codec.numcodecs_codec.register_codecs()
    assert numcodecs.registry.codec_registry[CODEC_ID] is RadiarcCodec
    assert get_codec_class(CODEC_ID) is RadiarcZarrCodec  # one implementation, no warning


def test_arrays_the_codec_cannot_code_are_refused_at_creation(tmp_path: Path) -> None:
    serializer = RadiarcZarrCodec(iterations=1)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        zarr.create_array(tmp_path / "f.zarr", shape=(8, 8), dtype="float32", serializer=serializer)
    with pytest.raises(ValueError, match="does not fit"):
        zarr.create_array(
            tmp_path / "b.zarr",
            shape=(8, 8),
            dtype="uint8",
            serializer=RadiarcZarrCodec(bits_stored=12, iterations=1),
        )


@pytest.mark.parametrize(
    "settings",
    [
        {},  # no rate setting
        {"iterations": 2, "min_psnr": 40.0},  # two
        {"iterations": 2, "weights_hash": "not hex at all!"},
        {"iterations": 2, "bits_stored": 20},
        {"iterations": 2, "colour": "blue"},
        {"iterations": 2, "adaptive": True},  # block stops spend a bit rate, not iterations
        {"min_ssim": 0.9, "half_res": True},  # so do half-resolution tiles
        {"iterations": 2, "refine_steps": -1},
        {"iterations": 2, "refine_steps": 1000},
    ],
)
def test_invalid_configs_are_refused_early(settings: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        RadiarcCodec.from_config({"id": CODEC_ID, **settings})
    with pytest.raises((ValueError, TypeError)):
        RadiarcZarrCodec.from_dict({"name": CODEC_ID, "configuration": settings})


def test_numcodecs_round_trip_is_the_direct_codec(source_8bit: GrayImage) -> None:
    chunk = source_8bit.pixels[50:98, 60:108].copy()  # a full 48x48 chunk, not flat at its end
    codec = RadiarcCodec(iterations=ITERATIONS)
    data = codec.encode(chunk)
    decoded = codec.decode(data)
    assert decoded.shape == chunk.shape and decoded.dtype == np.uint8
    direct = encode_image(GrayImage(chunk, 8), RateControl(iterations=ITERATIONS)).data
    assert len(data) == len(direct) + ENVELOPE_BYTES
    assert psnr(chunk, decoded, 8) >= psnr(chunk, decode_image(direct).pixels, 8) - 0.5
    out = np.empty_like(chunk)
    assert codec.decode(data, out=out) is out and np.array_equal(out, decoded)


def test_12bit_chunks_keep_their_depth(source_12bit: GrayImage) -> None:
    chunk = source_12bit.pixels[:48, :48].copy()
    codec = RadiarcCodec(bits_stored=12, iterations=ITERATIONS)
    decoded = codec.decode(codec.encode(chunk))
    assert decoded.dtype == np.uint16 and int(decoded.max()) <= 4095
    direct = encode_image(GrayImage(chunk, 12), RateControl(iterations=ITERATIONS)).data
    assert psnr(chunk, decoded, 12) >= psnr(chunk, decode_image(direct).pixels, 12) - 0.5


def test_encoding_with_other_weights_than_configured_is_refused(source_8bit: GrayImage) -> None:
    codec = RadiarcCodec(weights_hash="00" * 8, iterations=1)
    with pytest.raises(ValueError, match="installed weights"):
        codec.encode(source_8bit.pixels[:48, :48].copy())


# --- fill-value padding and flat borders ---------------------------------------------------------


def test_edge_chunk_codes_only_its_real_pixels(source_8bit: GrayImage) -> None:
    real = source_8bit.pixels[60:96, 70:110].copy()  # 36x40 of image in a 48x48 chunk
    padded = np.zeros((48, 48), np.uint8)
    padded[:36, :40] = real
    data = encode_chunk(padded, RadiarcCodec(iterations=ITERATIONS).settings)
    decoded = decode_chunk(data)
    assert decoded.shape == (48, 48)
    assert not decoded[36:].any() and not decoded[:, 40:].any()  # the fill value, exactly
    direct = encode_image(GrayImage(real, 8), RateControl(iterations=ITERATIONS)).data
    assert np.array_equal(decoded[:36, :40], decode_image(direct).pixels)
    assert len(data) == len(direct) + ENVELOPE_BYTES  # the padding costs nothing


def test_flat_trailing_rows_are_restored_exactly_wherever_they_are() -> None:
    chunk = np.full((48, 48), 9, np.uint8)
    chunk[:30, :20] = np.arange(600, dtype=np.uint8).reshape(30, 20) % 200
    chunk[10:14, :] = 9  # flat rows inside the image are coded, not cut
    assert content_extent(chunk) == (30, 20, 9)
    decoded = decode_chunk(encode_chunk(chunk, RadiarcCodec(iterations=1).settings))
    assert np.all(decoded[30:] == 9) and np.all(decoded[:, 20:] == 9)


def test_adaptive_chunks_stop_blocks_and_read_back_with_plain_zarr(
    chest_xray: GrayImage, tmp_path: Path
) -> None:
    """``adaptive`` in the codec config: each chunk is a format-2 stream (blocks stop refining
    one by one) within its bpp budget, and a reader needs nothing but ``zarr.open``."""
    pixels = chest_xray.pixels[100:356, 60:316].copy()  # lung field, mediastinum and edge
    codec = RadiarcCodec(bpp=0.25, adaptive=True)
    config = codec.get_config()
    assert config["adaptive"] is True and config["bpp"] == 0.25
    assert "adaptive" not in RadiarcCodec(bpp=0.25).get_config()  # older configs unchanged
    chunks = [pixels[:128, :128].copy(), pixels[128:, 128:].copy()]
    streams = [codec.encode(chunk) for chunk in chunks]
    for chunk, data in zip(chunks, streams, strict=True):
        _, stream = parse_envelope(data)
        assert bitstream.read_header(stream).block_stops
        assert len(stream) * 8 / chunk.size <= 0.25
    batched = encode_chunks(chunks, [codec.settings] * 2)
    assert [encoded.data for encoded in batched] == streams  # the actors' path codes the same

    serializer = RadiarcZarrCodec(bpp=0.25, adaptive=True)
    store = tmp_path / "adaptive.zarr"
    array = zarr.create_array(
        store, shape=pixels.shape, chunks=(128, 128), dtype=np.uint8, serializer=serializer
    )
    array[:] = pixels
    read = zarr.open_array(store, mode="r")[:]
    assert np.array_equal(read[:128, :128], decode_chunk(streams[0]))
    assert np.array_equal(read[128:, 128:], decode_chunk(streams[1]))
    assert psnr(pixels, read, 8) > 35


def test_half_res_chunks_pick_their_resolution_and_read_back_with_plain_zarr(
    chest_xray: GrayImage, tmp_path: Path
) -> None:
    """``half_res`` in the codec config: at a low rate a chunk whose half-resolution ladder
    removes more error per byte is a format-3 stream, on the actors' batch path too, and plain
    ``zarr.open`` reads back an array closer to the original than full resolution alone makes
    within the same budget."""
    pixels = chest_xray.pixels[100:356, 60:316].copy()
    bpp = 0.15  # 307 bytes a 128x128 chunk: one full-resolution iteration fits
    codec, full = RadiarcCodec(bpp=bpp, half_res=True), RadiarcCodec(bpp=bpp)
    assert codec.get_config()["half_res"] is True
    assert "half_res" not in full.get_config()  # older configs unchanged
    assert RadiarcCodec.from_config(codec.get_config()) == codec
    chunks = [pixels[r : r + 128, c : c + 128].copy() for r in (0, 128) for c in (0, 128)]
    batched = encode_chunks(chunks, [codec.settings] * len(chunks))
    versions = []
    for chunk, encoded in zip(chunks, batched, strict=True):
        _, stream = parse_envelope(encoded.data)
        versions.append(stream[4])
        assert encoded.target_met and len(stream) * 8 / chunk.size <= bpp
        # one chunk at a time (zarr's path) picks the same resolution as the actors' batches
        assert parse_envelope(codec.encode(chunk))[1][4] == stream[4]
    assert bitstream.TILE_MODES_VERSION in versions

    arrays = {}
    for name, serializer in (
        ("half", RadiarcZarrCodec(bpp=bpp, half_res=True)),
        ("full", RadiarcZarrCodec(bpp=bpp)),
    ):
        store = tmp_path / f"{name}.zarr"
        array = zarr.create_array(
            store, shape=pixels.shape, chunks=(128, 128), dtype=np.uint8, serializer=serializer
        )
        array[:] = pixels
        arrays[name] = zarr.open_array(store, mode="r")[:]
    assert np.array_equal(arrays["half"][:128, :128], decode_chunk(batched[0].data))
    assert psnr(pixels, arrays["half"], 8) > psnr(pixels, arrays["full"], 8) + 1


def test_refined_chunks_are_better_and_need_nothing_to_read(chest_xray: GrayImage) -> None:
    chunk = chest_xray.pixels[100:228, 60:188].copy()
    plain, refined = RadiarcCodec(iterations=1), RadiarcCodec(iterations=1, refine_steps=8)
    assert refined.get_config()["refine_steps"] == 8 and "refine_steps" not in plain.get_config()
    assert RadiarcCodec.from_config(refined.get_config()) == refined
    plain_psnr, refined_psnr = (
        psnr(chunk, codec.decode(codec.encode(chunk)), 8) for codec in (plain, refined)
    )
    assert refined_psnr > plain_psnr
    # any reader, whatever its own settings, decodes a refined chunk
    assert np.array_equal(
        plain.decode(refined.encode(chunk)), refined.decode(refined.encode(chunk))
    )


def test_a_flat_chunk_costs_only_the_envelope() -> None:
    chunk = np.full((48, 64), 1000, np.uint16)
    data = encode_chunk(chunk, RadiarcCodec(bits_stored=12, iterations=1).settings)
    assert len(data) == ENVELOPE_BYTES
    decoded = decode_chunk(data)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, chunk)


def test_interior_black_rows_read_back_as_the_fill_value(
    written: dict[str, tuple[Path, GrayImage]],
) -> None:
    for layout in LAYOUTS:
        pixels = zarr.open_array(written[layout][0], mode="r")[:]
        assert not pixels[40:48].any(), layout  # rows 40..47 close chunk row 0 and are black


# --- zarr arrays --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*LAYOUTS, "v3_12bit"])
def test_arrays_read_back_like_the_direct_codec(
    written: dict[str, tuple[Path, GrayImage]], name: str
) -> None:
    path, source = written[name]
    array = zarr.open_array(path, mode="r")
    pixels = array[:]
    assert pixels.shape == source.pixels.shape and pixels.dtype == source.pixels.dtype
    reference = direct_decode(source, CHUNKS)
    bits = source.bits_stored
    assert psnr(source.pixels, pixels, bits) >= psnr(source.pixels, reference, bits) - 0.5
    assert np.array_equal(array[10:70, 30:100], pixels[10:70, 30:100])


@pytest.fixture
def decoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts chunk decodes by wrapping our decoder where both codecs call it."""
    calls: list[int] = []

    def counting(data: bytes, expected: tuple[int, int] | None = None) -> np.ndarray:
        calls.append(len(data))
        return decode_chunk(data, expected)

    monkeypatch.setattr(codec.zarr_codec, "decode_chunk", counting)
    monkeypatch.setattr(codec.numcodecs_codec, "decode_chunk", counting)
    return calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_slice_decodes_only_the_chunks_it_touches(
    written: dict[str, tuple[Path, GrayImage]], layout: str, decoder_calls: list[int]
) -> None:
    array = zarr.open_array(written[layout][0], mode="r")
    array[10:60, 40:50]  # rows in chunks 0-1, columns in chunks 0-1 of a 3x3 grid
    assert len(decoder_calls) == 4
    decoder_calls.clear()
    array[50:52, 100:110]  # one chunk
    assert len(decoder_calls) == 1


def forged_with_model_id(data: bytes, model_id: str) -> bytes:
    """A chunk stream whose inner Radiarc stream names ``model_id``."""
    stream = bitstream.unpack(data[ENVELOPE_BYTES:])
    header = stream.header
    fields = ("weights_hash", "height", "width", "bits_stored", "tile_size", "code_channels")
    foreign = type(header)(model_id, *[getattr(header, f) for f in fields])
    return data[:ENVELOPE_BYTES] + bitstream.pack(Stream(foreign, stream.tiles))


def test_unknown_model_id_fails_naming_it_and_the_installed_ones(
    written: dict[str, tuple[Path, GrayImage]], tmp_path: Path
) -> None:
    chunk_file = written["v3"][0] / "c" / "0" / "0"
    forged = forged_with_model_id(chunk_file.read_bytes(), "radiarc-future-v9")
    with pytest.raises(UnknownModelError) as error:
        RadiarcCodec(iterations=1).decode(forged)
    assert "radiarc-future-v9" in str(error.value)
    assert all(model in str(error.value) for model in installed_models())
    # Through zarr, too: the error reaches the reader, never a silent fallback.
    copy = tmp_path / "forged.zarr"
    shutil.copytree(written["v3"][0], copy)
    (copy / "c" / "0" / "0").write_bytes(forged)
    with pytest.raises(UnknownModelError, match="radiarc-future-v9"):
        zarr.open_array(copy, mode="r")[:10, :10]


@pytest.mark.parametrize("damage", [b"", b"RDCK", b"JUNK" + bytes(40)])
def test_damaged_chunk_streams_raise_the_stream_error(damage: bytes) -> None:
    with pytest.raises(BitstreamError):
        decode_chunk(damage)


# --- readers with plain zarr ----------------------------------------------------------------------

READER = """
import json, sys
import numpy as np, zarr
ours = lambda: sorted(m for m in sys.modules if m == "codec" or m.startswith("codec."))
assert not ours(), ours()
for job in json.loads(sys.argv[1]):
    array = zarr.open_array(job["url"], mode="r", storage_options=job["options"])
    np.save(job["out"], array[:])
    np.save(job["out"] + ".region.npy", array[20:70, 30:90])
print(json.dumps(ours()))
"""


def read_in_fresh_interpreter(jobs: list[dict[str, Any]], cwd: Path) -> list[str]:
    """Run READER in a new interpreter; returns the Radiarc modules zarr loaded by itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", READER, json.dumps(jobs)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture
def s3_copy(s3_endpoint: str) -> Callable[[Path, str], str]:
    """Upload a local array to the S3 server; returns its s3:// URL."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    if not fs.exists("radiarc-test"):
        fs.mkdir("radiarc-test")

    def upload(path: Path, name: str) -> str:
        fs.put(str(path), f"radiarc-test/{name}", recursive=True)
        return f"s3://radiarc-test/{name}"

    return upload


@pytest.mark.parametrize("where", ["local", "s3"])
def test_plain_zarr_reads_radiarc_arrays_without_importing_radiarc(
    written: dict[str, tuple[Path, GrayImage]],
    where: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    jobs = []
    for name, (path, _) in written.items():
        if where == "local":
            url, options = str(path), None
        else:
            endpoint = request.getfixturevalue("s3_endpoint")
            url = request.getfixturevalue("s3_copy")(path, f"{name}.zarr")
            options = {"endpoint_url": endpoint}
        jobs.append({"url": url, "options": options, "out": str(tmp_path / f"{name}.npy")})
    loaded = read_in_fresh_interpreter(jobs, cwd=tmp_path)
    assert "codec.zarr_codec" in loaded and "codec.numcodecs_codec" in loaded  # entry points
    for name, (path, source) in written.items():
        pixels = np.load(tmp_path / f"{name}.npy")
        here = zarr.open_array(path, mode="r")[:]
        assert np.array_equal(pixels, here), name  # same as decoding the streams in-process
        assert np.array_equal(np.load(tmp_path / f"{name}.npy.region.npy"), here[20:70, 30:90])
        reference = direct_decode(source, CHUNKS)
        bits = source.bits_stored
        assert psnr(source.pixels, pixels, bits) >= psnr(source.pixels, reference, bits) - 0.5


# --- backwards compatibility ---------------------------------------------------------------------

FIXTURE_ARRAYS = {
    "v2_uint8": ("v2", 8),
    "v3_uint8": ("v3", 8),
    "v3_sharded_uint8": ("sharded", 8),
    "v2_uint16_12bit": ("v2", 12),
    "v3_uint16_12bit": ("v3", 12),
}


def write_fixtures(directory: Path, chest_xray: GrayImage, xray_12bit: GrayImage) -> None:
    """(Re)write the fixture arrays, 64x80 with 48x48 chunks (edge chunks on both axes), and
    the pixels they decode to now."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    sources = {
        8: GrayImage(chest_xray.pixels[400:464, 300:380].copy(), 8),
        12: GrayImage(xray_12bit.pixels[64:128, 96:176].copy(), 12),
    }
    for name, (layout, bits) in FIXTURE_ARRAYS.items():
        path = directory / f"{name}.zarr"
        write_array(path, sources[bits], layout)
        np.save(directory / f"{name}.npy", zarr.open_array(path, mode="r")[:])


def test_fixtures_written_earlier_still_decode(
    chest_xray: GrayImage, xray_12bit: GrayImage
) -> None:
    if os.environ.get("GENERATE_EXPECTED") == "1":
        write_fixtures(FIXTURES, chest_xray, xray_12bit)
    for name in FIXTURE_ARRAYS:
        expected = np.load(FIXTURES / f"{name}.npy")
        try:
            pixels = zarr.open_array(FIXTURES / f"{name}.zarr", mode="r")[:]
        except BitstreamError as error:
            pytest.fail(
                f"{name}: {error}. If the shipped weights were replaced on purpose, regenerate "
                "with GENERATE_EXPECTED=1 pytest tests/test_zarr_codec.py -k fixtures"
            )
        assert pixels.dtype == expected.dtype and pixels.shape == expected.shape == (64, 80)
        difference = np.abs(pixels.astype(np.int32) - expected.astype(np.int32))
        assert int(difference.max()) <= 1, name


def test_a_chunk_declaring_another_shape_is_refused_before_allocating() -> None:
    """A corrupt or hostile chunk may claim any size up to the format's limit; the reader
    checks it against the array's chunk shape first, so it never allocates what it claims."""
    from codec.chunk import pack_envelope

    with pytest.raises(BitstreamError, match="the array expects"):
        decode_chunk(pack_envelope((8192, 8192), 2, 0), expected=(512, 512))
    huge = pack_envelope((65535, 65535), 2, 0)
    with pytest.raises(BitstreamError, match="pixels"):
        decode_chunk(huge)  # no shape known (numcodecs without ``out``): the global cap
