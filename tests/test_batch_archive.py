"""The batch path of a migration worker, without Ray: many chunks of many images through the
network at once (codec.chunk.encode_chunks), stored where zarr looks for them
(storage.chunks.put_chunks), verified against a per-tile quality floor (codec.rate.check_floor),
and the Encoder that Ray runs as an actor, called in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from storage_helpers import LUT, MONO1, small_pngs

from codec.chunk import ChunkSettings, decode_chunk, encode_chunk, encode_chunks, parse_envelope
from codec.io import GrayImage
from codec.rate import RateControl, check_floor
from flows.actors import Encoder, EncoderJob, is_transient, with_retries
from storage.archive import Archive, ArchiveSettings, RunContext
from storage.chunks import chunk_arrays, put_chunks, stored_chunks
from storage.fsutil import join
from storage.scan import scan
from storage.synth import write_export

pytestmark = pytest.mark.usefixtures("one_thread_torch")


def mixed_chunks() -> tuple[list[np.ndarray], list[ChunkSettings]]:
    """Interior, edge (zero-padded) and all-zero chunks, 8- and 12-bit, as zarr hands them."""
    eight = small_pngs(2, side=64)
    twelve = (eight[1].pixels.astype(np.uint16) << 4) | 5
    chunks = [eight[0].pixels, eight[1].pixels, twelve, np.zeros((64, 64), np.uint8)]
    edge = np.zeros((64, 64), np.uint8)
    edge[:40, :23] = eight[0].pixels[:40, :23]
    chunks.append(edge)
    bits = [8, 8, 12, 8, 8]
    return chunks, [ChunkSettings.create(bits_stored=b, iterations=2) for b in bits]


@pytest.mark.parametrize(
    "rate", [{"iterations": 2}, {"bpp": 0.6}, {"min_ssim": 0.9}, {"min_psnr": 30.0}]
)
def test_batched_chunks_are_the_streams_zarr_would_write(rate: dict) -> None:
    chunks, configs = mixed_chunks()
    configs = [ChunkSettings.create(bits_stored=c.bits_stored, **rate) for c in configs]
    batched = encode_chunks(chunks, configs, batch_size=3)
    for chunk, config, result in zip(chunks, configs, batched, strict=True):
        assert result.data == encode_chunk(chunk, config)
        assert decode_chunk(result.data).shape == chunk.shape
    assert batched[3].iterations == 0 and len(batched[3].data) == 20  # one value: envelope only
    assert all(result.iterations >= 1 for i, result in enumerate(batched) if i != 3)


@pytest.mark.parametrize("half_res", [False, True])
def test_the_chunks_of_one_image_share_its_bpp_budget(
    chest_xray: GrayImage, half_res: bool
) -> None:
    """With ``images``, a bpp target is the image's: bytes go to the chunks where they remove
    the most error, so the image keeps within the target, spends more of it than chunks
    budgeted one by one (each of which must round down to whole iterations), and decodes
    closer to the original."""
    pixels = chest_xray.pixels[200:456, 300:556]
    cut = chunk_arrays(pixels, 128)
    chunks = [chunk for _, chunk in cut]
    configs = [ChunkSettings.create(bpp=0.2, half_res=half_res)] * len(chunks)
    alone = encode_chunks(chunks, configs)
    shared = encode_chunks(chunks, configs, images=[0] * len(chunks))

    def streams_bpp(encoded: list) -> float:  # the Radiarc streams, as the budget counts them
        return sum(len(parse_envelope(e.data)[1]) for e in encoded) * 8 / pixels.size

    def error(encoded: list) -> float:
        decoded = np.block(
            [[decode_chunk(encoded[2 * r + c].data) for c in (0, 1)] for r in (0, 1)]
        )
        return float(np.sum((decoded.astype(np.float64) - pixels) ** 2))

    assert all(e.target_met for e in shared)
    assert streams_bpp(alone) < streams_bpp(shared) <= 0.2
    assert error(shared) < error(alone)
    # two images in one call: each keeps its own budget
    both = encode_chunks(chunks + chunks, configs * 2, images=[0] * 4 + [1] * 4)
    assert [e.data for e in both] == [e.data for e in shared] * 2
    with pytest.raises(ValueError, match="image numbers"):
        encode_chunks(chunks, configs, images=[0])


def test_chunk_arrays_cut_like_zarr() -> None:
    pixels = np.zeros((100, 70), np.uint16)
    pixels[10:, 5:65] = 700
    pixels[:, 64:] = 0  # the right-hand column of chunks is all zero
    cut = dict(chunk_arrays(pixels, 32))
    assert set(cut) == {(r, c) for r in range(4) for c in range(2)}  # (r, 2) all zero: left out
    assert cut[(3, 1)].shape == (32, 32) and not cut[(3, 1)][4:].any()  # zero-padded edge


@pytest.mark.parametrize("shard_tiles", [None, 2])
def test_put_chunks_reads_back_through_plain_zarr(tmp_path: Path, shard_tiles: int | None) -> None:
    image = GrayImage(np.ascontiguousarray(small_pngs(1, side=96)[0].pixels[:80, :90]), 8)
    settings = ArchiveSettings(
        rate=RateControl(iterations=2), tile_size=32, shard_tiles=shard_tiles
    )
    archive = Archive(str(tmp_path))
    shards = (64, 64) if shard_tiles else None
    codec = settings.serializer(8)
    arrays = {}
    for name in ("by-zarr", "by-batch"):
        arrays[name] = zarr.open_group(archive.store, mode="a").create_array(
            name=name,
            shape=image.pixels.shape,
            chunks=(32, 32),
            shards=shards,
            dtype="uint8",
            serializer=codec,
            compressors=None,
            fill_value=0,
        )
    arrays["by-zarr"][...] = image.pixels
    cut = chunk_arrays(image.pixels, 32)
    streams = encode_chunks([c for _, c in cut], [codec.settings] * len(cut))
    metadata = arrays["by-batch"].metadata.to_dict()
    put_chunks(
        archive.fs,
        join(archive.root, "by-batch"),
        metadata,
        {index: stream.data for (index, _), stream in zip(cut, streams, strict=True)},
    )
    expected = np.asarray(archive.open_array("by-zarr")[...])
    assert np.array_equal(np.asarray(archive.open_array("by-batch")[...]), expected)
    sizes = [stored_chunks(archive.fs, join(archive.root, name), metadata) for name in arrays]
    assert sizes[0] == sizes[1]


def test_quality_floor_is_checked_per_tile() -> None:
    original = small_pngs(1, side=64)[0].pixels
    assert check_floor(original, original, 8, 32, RateControl(iterations=2)) is None
    perfect = check_floor(original, original, 8, 32, RateControl(min_psnr=40))
    assert perfect is not None and perfect.met and perfect.checked == 4
    damaged = original.copy()
    damaged[40:, 40:] = 0  # one tile ruined
    check = check_floor(original, damaged, 8, 32, RateControl(min_ssim=0.9))
    assert check is not None and (check.checked, check.below) == (4, 1)
    assert check.describe().startswith("1 of 4 tiles miss ssim>=0.9")


def test_encoder_archives_a_batch_in_process(tmp_path: Path) -> None:
    export, archive_dir = f"{tmp_path}/export", f"{tmp_path}/archive"
    write_export(export, small_pngs(2, side=48))
    (tmp_path / "export" / "real").mkdir()
    for path in (MONO1, LUT):  # LUT: a leading-zero UID, skipped before any coding
        (tmp_path / "export" / "real" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "export" / "broken.dcm").write_bytes(MONO1.read_bytes()[:3000])
    Archive(archive_dir)
    settings = ArchiveSettings(rate=RateControl(iterations=1), tile_size=64)
    encoder = Encoder(EncoderJob(export, archive_dir, settings, RunContext("batch-run")))
    assert "cpu" in encoder.ready()

    result = encoder.process(list(scan(export)))

    statuses = sorted((row.status, row.reason is None) for row in result.rows)
    assert statuses == [("archived", True)] * 3 + [("skipped", False)] * 2
    assert result.tiles == 2 + 49  # two 48x48 images, MONO1's 440x440 in 64-pixel tiles
    assert set(result.seconds) == {"read", "encode", "write", "verify"}
    assert result.seconds["encode"] > 0 and result.peak_rss_mb > 0
    archived = [row for row in result.rows if row.status == "archived"]
    assert all(row.worker == result.worker and row.iterations_max == 1 for row in archived)


def test_only_transient_io_errors_are_retried() -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("dropped")
        return "read"

    assert with_retries(flaky, 3, 0.0) == "read" and len(attempts) == 3
    assert not is_transient(FileNotFoundError("gone")) and not is_transient(ValueError("bad"))
    missing: list[int] = []

    def gone() -> None:
        missing.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        with_retries(gone, 3, 0.0)
    assert len(missing) == 1


def test_encoders_never_import_prefect() -> None:
    """Ray workers import flows.actors; Prefect there would start an API server per worker."""
    import subprocess
    import sys

    code = "import sys, flows.actors; print(sorted(m for m in sys.modules if 'prefect' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_skipped_sources_are_settled_unless_they_could_not_be_read(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from storage.manifest import ManifestRow, ManifestWriter, skipped_sources

    now = datetime.now(UTC)

    def row(checksum: str, status: str, reason: str | None, minutes: int) -> ManifestRow:
        return ManifestRow(
            "r1",
            status,
            now + timedelta(minutes=minutes),
            "w",
            reason=reason,
            source_checksum=checksum,
            sop_instance_uid="1.2" if status != "skipped" else None,
        )

    with ManifestWriter(str(tmp_path), "r1") as writer:
        writer.add(row("sha256:colour", "skipped", "colour images are not supported", 0))
        writer.add(row("sha256:flaky", "skipped", "cannot read (TimeoutError)", 0))
        writer.add(row("sha256:fixed", "skipped", "invalid UID", 0))
        writer.add(row("sha256:fixed", "archived", None, 1))  # a later run archived it
    assert skipped_sources(str(tmp_path)) == {"sha256:colour"}


def test_count_files_lists_without_reading(tmp_path: Path) -> None:
    from storage.scan import count_files

    write_export(str(tmp_path / "export"), small_pngs(2, side=32), count=5)
    (tmp_path / "export" / "notes.txt").write_text("not DICOM")
    assert count_files(str(tmp_path / "export")) == 6
