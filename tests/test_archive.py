"""The archive layout (storage.archive), UID validation (storage.uids), chunk accounting.

Codec quality is not asserted beyond sanity: the shipped weights are a placeholder. What is
asserted is the layout, the attributes, that the stored bytes decode to what the manifest row
reports, and that bad inputs are skipped with a reason instead of being guessed at.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from storage_helpers import CHEAP, LUT, MONO1, PATIENT, RG3, cropped, small_pngs, write_local_export

from codec.chunk import pack_envelope
from codec.metrics import measure
from codec.rate import RateControl
from storage.archive import Archive, ArchiveSettings, RunContext, archive_instance, archive_item
from storage.dicom import read_dicom
from storage.fsutil import open_fs
from storage.manifest import ManifestRow
from storage.phi import quiet_pydicom
from storage.scan import scan
from storage.source import SourceImage, read_uri
from storage.synth import dicom_bytes, synthetic_dicom
from storage.uids import UIDError, derived_uid, validate_uid

pytestmark = pytest.mark.usefixtures("one_thread_torch")
CONTEXT = RunContext("test-run", worker="tester", patient_key_secret=b"secret")


# --------------------------------------------------------------------------------- UIDs


@pytest.mark.parametrize(
    "uid", ["1.2.840.10008.5.1.4.1.1.1", "0", "2.25.0", "1." + "2" * 62, "1.2.392.200036.9125.0"]
)
def test_valid_uids_pass(uid: str) -> None:
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    ("uid", "why"),
    [
        ("", "missing"),
        (None, "missing"),
        ("..", "digits and single dots"),
        ("1..2", "digits and single dots"),
        (".1.2", "digits and single dots"),
        ("1.2.", "digits and single dots"),
        ("1.2/3", "digits and single dots"),
        ("../../etc/passwd", "digits and single dots"),
        ("1.2\\3", "digits and single dots"),
        ("1.2 3", "digits and single dots"),
        ("1.2.\n3", "digits and single dots"),
        ("1." + "2" * 63, "at most 64"),
        ("1.02.3", "leading zero"),
        ("999.999.01.23.45.6789", "leading zero"),
        ("１.２", "digits and single dots"),  # full-width digits
    ],
)
def test_malformed_or_hostile_uids_are_refused(uid: str | None, why: str) -> None:
    with pytest.raises(UIDError, match=why):
        validate_uid(uid, "SOPInstanceUID")


def test_lenient_mode_accepts_only_leading_zeros() -> None:
    assert validate_uid("999.999.01.23", lenient=True) == "999.999.01.23"
    for hostile in ("..", "1..2", "a.b", "1/2", "1." + "2" * 63):
        with pytest.raises(UIDError):
            validate_uid(hostile, lenient=True)


@given(st.text(max_size=80))
def test_anything_accepted_is_a_safe_path_component(text: str) -> None:
    try:
        uid = validate_uid(text, lenient=True)
    except UIDError:
        return
    assert 0 < len(uid) <= 64 and set(uid) <= set("0123456789.")
    assert ".." not in uid and not uid.startswith(".") and not uid.endswith(".")


def test_refusal_does_not_echo_hostile_text() -> None:
    with pytest.raises(UIDError) as caught:
        validate_uid("1.2\r\nINJECTED LOG LINE", "StudyInstanceUID")
    assert "INJECTED" not in str(caught.value) and "value not shown" in str(caught.value)


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    first = derived_uid("1.2.3.4", "rnnconv-pool-v1", "abcd")
    assert first == derived_uid("1.2.3.4", "rnnconv-pool-v1", "abcd")
    assert first.startswith("2.25.") and validate_uid(first) == first
    assert first != derived_uid("1.2.3.4", "rnnconv-pool-v1", "abce")
    assert first != derived_uid("1.2.3.5", "rnnconv-pool-v1", "abcd")
    rooted = derived_uid("1.2.3.4", "m", prefix="1.2.826.0.1.3680043.10.999.")
    assert rooted.startswith("1.2.826.0.1.3680043.10.999.") and len(rooted) <= 64
    assert validate_uid(rooted) == rooted
    with pytest.raises(UIDError):
        derived_uid("1.2.3.4", prefix="1.2.03.")


# ---------------------------------------------------------------------------- settings


def test_codec_key_names_the_configuration() -> None:
    assert (
        CHEAP.codec_key()
        == ArchiveSettings(rate=RateControl(iterations=2), tile_size=64).codec_key()
    )
    assert CHEAP.codec_key() != replace(CHEAP, tile_size=128).codec_key()
    assert CHEAP.codec_key() != replace(CHEAP, rate=RateControl(iterations=3)).codec_key()
    assert CHEAP.codec_key() != replace(CHEAP, shard_tiles=2).codec_key()
    config = CHEAP.codec_config()
    assert (
        config["iterations"] == 2
        and config["tile_size"] == 64
        and len(config["weights_hash"]) == 16
    )
    with pytest.raises(ValueError):
        ArchiveSettings(tile_size=8)


# ------------------------------------------------------------------------ archiving


def synthetic_source(index: int = 0, side: int = 96, **header: str) -> SourceImage:
    image = small_pngs(index + 1, side)[index]
    dataset = synthetic_dicom(image, f"archive-test:{index}", patient=PATIENT)
    for keyword, value in header.items():
        setattr(dataset, keyword, value)
    data = dicom_bytes(dataset)
    return SourceImage(
        f"/exports/{PATIENT.name}/IMG{index}", read_dicom(data), len(data), "ab" * 32
    )


@pytest.fixture(scope="module")
def local_archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    return Archive(str(tmp_path_factory.mktemp("archive") / "archive.zarr"))


@pytest.fixture(scope="module")
def mono1_row(local_archive: Archive) -> ManifestRow:
    """The real preamble-less 10-bit chest file, whole (440x440), on 512-pixel tiles."""
    settings = ArchiveSettings(rate=RateControl(iterations=2))
    return archive_instance(local_archive, read_uri(str(MONO1)), settings, CONTEXT)


def test_real_dicom_is_archived_with_layout_and_attributes(
    local_archive: Archive, mono1_row: ManifestRow
) -> None:
    row = mono1_row
    assert row.status == "archived", row.reason
    header = read_dicom(MONO1).header
    path = f"{header.StudyInstanceUID}/{header.SeriesInstanceUID}/{header.SOPInstanceUID}"
    assert local_archive.locate(str(header.SOPInstanceUID)) == path
    array = zarr.open_array(f"{local_archive.root}/{path}", mode="r")  # plain zarr
    assert array.shape == (440, 440) and array.dtype == np.uint16 and array.chunks == (512, 512)
    codec = array.metadata.to_dict()["codecs"][0]
    assert codec["name"] == "radiarc.rnnconv" and codec["configuration"]["bits_stored"] == 10
    attrs = array.attrs.asdict()
    radiarc = attrs["radiarc"]
    assert radiarc["complete"] is True and radiarc["layout_version"] == 1
    assert radiarc["source"]["uri"] == str(MONO1)
    assert radiarc["source"]["sha256"] == row.source_checksum.removeprefix("sha256:")
    assert radiarc["source"]["transfer_syntax_uid"] == "1.2.840.10008.1.2"
    assert radiarc["pixels"] == {
        "rows": 440,
        "columns": 440,
        "bits_stored": 10,
        "bits_allocated": 16,
        "photometric": "MONOCHROME1",
        "high_bits_masked": False,
    }
    assert radiarc["codec"]["codec_key"] == row.codec_key
    # The header comes back whole from DICOM JSON, pixel data excepted.
    with quiet_pydicom():  # the 1990s file has dates like 1995.07.20
        restored = Dataset.from_json(attrs["dicom"])
    assert "PixelData" not in restored
    for keyword in ("PatientName", "StudyInstanceUID", "Modality", "BitsStored", "ImageType"):
        assert restored.get(keyword) == header.get(keyword)


def test_row_metrics_are_those_of_the_stored_bytes(
    local_archive: Archive, mono1_row: ManifestRow
) -> None:
    row = mono1_row
    source = read_dicom(MONO1).image
    path = local_archive.locate(row.sop_instance_uid or "")
    decoded = local_archive.open_array(path)[...]
    quality = measure(source.pixels, decoded, 10)
    assert row.psnr == pytest.approx(quality.psnr) and row.ssim == pytest.approx(quality.ssim)
    assert row.ms_ssim == pytest.approx(quality.ms_ssim)
    assert row.max_abs_error == quality.max_abs_error
    chunk = Path(local_archive.root, path, "c", "0", "0")
    assert row.archived_bytes == chunk.stat().st_size
    assert row.metadata_bytes == Path(local_archive.root, path, "zarr.json").stat().st_size
    assert row.pixel_bytes == 440 * 440 * 2 and row.ratio == pytest.approx(
        440 * 440 * 2 / row.archived_bytes
    )
    assert row.bpp == pytest.approx(row.archived_bytes * 8 / 440**2)
    assert row.iterations == 2 and row.iterations_min == row.iterations_max == 2
    assert row.modality == "CR" and row.body_part == "CHEST" and row.photometric == "MONOCHROME1"
    assert row.patient_key is None  # this file has no Patient ID
    assert row.encode_seconds > 0 and row.verify_seconds > 0 and row.total_seconds > 0
    assert math.isfinite(row.psnr) and 0 < row.ssim <= 1


def test_sharded_arrays_count_iterations_through_the_shard_index(local_archive: Archive) -> None:
    source = synthetic_source(0, side=96)
    settings = replace(CHEAP, shard_tiles=2, rate=RateControl(iterations=3))
    row = archive_instance(local_archive, source, settings, CONTEXT)
    assert row.status == "archived", row.reason
    array = local_archive.open_array(local_archive.locate(row.sop_instance_uid or ""))
    assert array.metadata.to_dict()["codecs"][0]["name"] == "sharding_indexed"
    assert array.shards == (128, 128) and array.chunks == (64, 64)
    assert row.iterations_min == row.iterations_max == 3
    assert row.archived_bytes and row.archived_bytes > 0
    np.testing.assert_array_equal(array[...].shape, (96, 96))


def test_patient_key_is_a_keyed_hash(local_archive: Archive) -> None:
    source = synthetic_source(1, side=64)
    row = archive_instance(local_archive, source, CHEAP, CONTEXT)
    other = archive_instance(
        local_archive, source, CHEAP, replace(CONTEXT, patient_key_secret=b"x")
    )
    unkeyed = archive_instance(
        local_archive, source, CHEAP, replace(CONTEXT, patient_key_secret=None)
    )
    assert row.patient_key and len(row.patient_key) == 64
    assert row.patient_key != other.patient_key and unkeyed.patient_key is None
    assert PATIENT.patient_id not in (row.patient_key or "")
    # The source path named the patient; the manifest's copy does not.
    assert row.source_uri == "/exports/<redacted>/IMG1"


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom, on setting the values
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyInstanceUID", ".."),
        ("SeriesInstanceUID", "1.2/../../x"),
        ("SOPInstanceUID", "1." + "9" * 70),
        ("SOPInstanceUID", "1.2.03"),
    ],
)
def test_hostile_uids_skip_the_image_and_write_nothing(
    tmp_path: Path, keyword: str, value: str
) -> None:
    archive = Archive(str(tmp_path / "a.zarr"))
    row = archive_instance(archive, synthetic_source(0, 32, **{keyword: value}), CHEAP, CONTEXT)
    assert row.status == "skipped" and keyword in (row.reason or "")
    assert row.sop_instance_uid is None
    written = {p.name for p in tmp_path.rglob("*")}
    assert written == {"a.zarr", "zarr.json", "manifests"}


def test_leading_zero_uid_is_skipped_unless_lenient(tmp_path: Path) -> None:
    archive = Archive(str(tmp_path / "a.zarr"))
    source = read_uri(str(LUT))
    small = replace(source, dicom=cropped(source.dicom, 64))
    strict = archive_instance(archive, small, CHEAP, CONTEXT)
    assert strict.status == "skipped" and "leading zero" in (strict.reason or "")
    lenient = archive_instance(archive, small, replace(CHEAP, lenient_uids=True), CONTEXT)
    assert lenient.status == "archived" and lenient.sop_instance_uid == "999.999.01.23.45.6789"
    assert archive.locate("999.999.01.23.45.6789").endswith("/999.999.01.23.45.6789")


def test_jpeg2000_source_is_archived(tmp_path: Path) -> None:
    archive = Archive(str(tmp_path / "a.zarr"))
    source = read_uri(str(RG3))
    row = archive_instance(
        archive, replace(source, dicom=cropped(source.dicom, 96)), CHEAP, CONTEXT
    )
    assert row.status == "archived" and row.bits_stored == 10 and row.rows == 96
    attrs = archive.open_array(archive.locate(row.sop_instance_uid or "")).attrs.asdict()
    assert attrs["radiarc"]["source"]["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.90"


def test_encoding_failure_gives_a_failed_row_without_patient_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import storage.archive as archive_module

    def explode(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"disk full while writing {PATIENT.name}")

    monkeypatch.setattr(archive_module, "_write_and_verify", explode)
    archive = Archive(str(tmp_path / "a.zarr"))
    row = archive_instance(archive, synthetic_source(0, 32), CHEAP, CONTEXT)
    assert (
        row.status == "failed" and row.reason == "RuntimeError: disk full while writing <redacted>"
    )
    assert row.sop_instance_uid and row.codec_key
    assert PATIENT.name not in caplog.text and "<redacted>" in caplog.text


def test_archive_item_runs_scan_output_end_to_end(tmp_path: Path) -> None:
    write_local_export(tmp_path / "export", small_pngs(3, side=48))
    fs, _ = open_fs(str(tmp_path / "export"))
    archive = Archive(str(tmp_path / "a.zarr"))
    rows = [
        archive_item(archive, fs, item, CHEAP, CONTEXT)
        for item in scan(str(tmp_path / "export"))
        if not item.uri.endswith("chest")  # the 440x440 file is covered above
    ]
    assert [row.status for row in rows] == ["archived"] * 3
    assert all(row.source_checksum and row.source_checksum.startswith("sha256:") for row in rows)
    assert all(row.read_seconds is not None for row in rows)


def test_unarchivable_file_gives_a_skipped_row(tmp_path: Path) -> None:
    image = small_pngs(1, side=32)[0]
    dataset = synthetic_dicom(image, "two-frames", patient=PATIENT)
    dataset.NumberOfFrames = 2
    path = tmp_path / "multi.dcm"
    path.write_bytes(dicom_bytes(dataset))
    fs, _ = open_fs(str(tmp_path))
    (item,) = scan(str(tmp_path))
    row = archive_item(Archive(str(tmp_path / "a.zarr")), fs, item, CHEAP, CONTEXT)
    assert row.status == "skipped" and "multi-frame" in (row.reason or "")
    assert row.source_checksum == item.checksum and row.source_bytes == item.size


def test_s3_archive_reads_back_with_plain_zarr(s3_bucket: tuple[str, dict[str, str]]) -> None:
    bucket, options = s3_bucket
    archive = Archive(f"s3://{bucket}/archive", options)
    row = archive_instance(archive, synthetic_source(2, side=80), CHEAP, CONTEXT)
    assert row.status == "archived", row.reason
    path = archive.locate(row.sop_instance_uid or "")
    array = zarr.open_array(f"s3://{bucket}/archive/{path}", mode="r", storage_options=options)
    assert array.shape == (80, 80) and array.attrs["radiarc"]["complete"] is True
    assert json.loads(row.codec_config or "{}")["tile_size"] == 64
    reopened = Archive(f"s3://{bucket}/archive", options, create=False)
    assert reopened.locate(f"{path}") == path
    with pytest.raises(FileNotFoundError):
        Archive(f"s3://{bucket}/elsewhere", options, create=False)


def test_run_context_reads_the_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RADIARC_PATIENT_KEY_SECRET", "s3cret")
    assert RunContext.from_env("r").patient_key_secret == b"s3cret"
    assert "s3cret" not in repr(RunContext.from_env("r"))
    monkeypatch.delenv("RADIARC_PATIENT_KEY_SECRET")
    assert RunContext.from_env("r").patient_key_secret is None
    with pytest.raises(ValueError):
        RunContext("../escape")


def test_a_bpp_target_is_the_images_budget_shared_by_its_chunks(tmp_path: Path) -> None:
    """Archived at ``bpp``: the chunk streams together (envelopes aside) keep within the
    image's budget, and chunks get different shares of it (iterations differ)."""
    archive = Archive(str(tmp_path / "archive.zarr"))
    settings = ArchiveSettings(rate=RateControl(bpp=0.25), tile_size=128)
    row = archive_instance(archive, read_uri(str(MONO1)), settings, CONTEXT)
    assert row.status == "archived", row.reason
    chunks = 4 * 4  # 440x440 on 128-pixel chunks, none of them all zero
    envelope = len(pack_envelope((128, 128), 2, 0))
    streams_bits = (row.archived_bytes - chunks * envelope) * 8
    assert 0.2 * 440**2 < streams_bits <= 0.25 * 440**2
    assert row.iterations_min < row.iterations_max
    path = archive.locate(row.sop_instance_uid or "")
    array = zarr.open_array(f"{archive.root}/{path}", mode="r")  # plain zarr
    decoded = np.asarray(array[...])
    assert measure(read_dicom(MONO1).image.pixels, decoded, 10).psnr == pytest.approx(row.psnr)
