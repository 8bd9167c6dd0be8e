"""Export back to DICOM (storage.export, ``radiarc export``), read back with pydicom."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from storage_helpers import CHEAP, MONO1, PATIENT, RG3, cropped, small_pngs
from typer.testing import CliRunner

from codec.rate import RateControl
from flows.cli import app
from storage.archive import Archive, ArchiveSettings, RunContext, archive_instance
from storage.dicom import read_dicom
from storage.export import METHOD, ExportError, export_dataset, export_dicom
from storage.manifest import ManifestRow, ManifestWriter
from storage.phi import quiet_pydicom
from storage.source import SourceImage, read_uri
from storage.synth import dicom_bytes, synthetic_dicom
from storage.uids import validate_uid

pytestmark = pytest.mark.usefixtures("one_thread_torch")
CONTEXT = RunContext("export-test", worker="tester")
runner = CliRunner()
# What an export may change; every other element of the original header must come back.
CHANGED = {
    "SOPInstanceUID",
    "ImageType",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "DerivationDescription",
    "DerivationCodeSequence",
    "SourceImageSequence",
    "PixelData",
}


def read_back(path: Path) -> Dataset:
    with quiet_pydicom():
        dataset = pydicom.dcmread(path)  # no force: a valid Part 10 file
        _ = list(dataset)  # parse every element
    return dataset


def assert_header_kept(
    original: Dataset, exported: Dataset, also_changed: frozenset[str] = frozenset()
) -> None:
    with quiet_pydicom():
        for element in original:
            if element.tag.element == 0 or element.keyword in CHANGED | also_changed:
                continue  # group lengths of ACR-NEMA files are dropped
            assert element.tag in exported, f"{element.keyword or element.tag} lost"
            assert exported[element.tag].value == element.value, element.keyword


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory) -> tuple[Archive, ManifestRow]:
    """The real 440x440 ACR-NEMA chest file, archived with its manifest row written."""
    archive = Archive(str(tmp_path_factory.mktemp("export") / "archive.zarr"))
    row = archive_instance(
        archive, read_uri(str(MONO1)), ArchiveSettings(rate=RateControl(iterations=2)), CONTEXT
    )
    assert row.status == "archived", row.reason
    with ManifestWriter(archive.uri, CONTEXT.run_id) as writer:
        writer.add(row)
    return archive, row


def test_export_is_a_valid_lossy_derived_dicom(
    archived: tuple[Archive, ManifestRow], tmp_path: Path
) -> None:
    archive, row = archived
    out = tmp_path / "out.dcm"
    export_dicom(archive.uri, str(row.sop_instance_uid), str(out))
    exported = read_back(out)
    original = read_dicom(MONO1).header

    assert exported.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert exported.file_meta.MediaStorageSOPInstanceUID == exported.SOPInstanceUID
    assert exported.file_meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert_header_kept(original, exported)

    # Pixels: exactly what the archive decodes to, in the original layout.
    stored = archive.open_array(archive.locate(str(row.sop_instance_uid)))[...]
    assert exported.BitsAllocated == 16 and exported.BitsStored == 10 and exported.HighBit == 9
    assert exported.PhotometricInterpretation == "MONOCHROME1"  # never inverted
    np.testing.assert_array_equal(exported.pixel_array, stored)
    assert read_dicom(out).image.pixels.shape == (440, 440)

    # Lossy compression and derivation, as PS3.3 C.7.6.1.1.5 asks.
    assert exported.LossyImageCompression == "01"
    assert float(exported.LossyImageCompressionRatio) == pytest.approx(row.ratio, rel=1e-3)
    assert exported.LossyImageCompressionMethod == METHOD and len(METHOD) <= 16
    assert exported.ImageType[0] == "DERIVED"
    new_uid = exported.SOPInstanceUID
    assert new_uid != original.SOPInstanceUID and validate_uid(new_uid) == new_uid
    (source,) = exported.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert source.ReferencedSOPClassUID == original.SOPClassUID
    assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
    assert exported.DerivationCodeSequence[0].CodeValue == "113040"
    assert "Radiarc" in exported.DerivationDescription and "ratio" in exported.DerivationDescription
    assert exported.StudyInstanceUID == original.StudyInstanceUID


def test_export_checks_the_stored_checksum(
    archived: tuple[Archive, ManifestRow], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Exports decode the bytes they hashed; the digest recorded at archive time must match
    (corruption is tested in test_verify.py)."""
    archive, row = archived
    stored = archive.open_array(archive.locate(str(row.sop_instance_uid))).attrs["radiarc"][
        "stored"
    ]
    assert stored["sha256"] == row.stored_sha256 and stored["bytes"] == row.archived_bytes
    with caplog.at_level(logging.WARNING, logger="storage.export"):
        export_dicom(archive.uri, str(row.sop_instance_uid), str(tmp_path / "checked.dcm"))
    assert not [record for record in caplog.records if "checksum" in record.getMessage()]


def test_new_uid_is_deterministic(archived: tuple[Archive, ManifestRow], tmp_path: Path) -> None:
    archive, row = archived
    first = export_dicom(archive.uri, str(row.sop_instance_uid), str(tmp_path / "a.dcm"))
    second = export_dicom(archive.uri, str(row.sop_instance_uid), str(tmp_path / "b.dcm"))
    assert first.SOPInstanceUID == second.SOPInstanceUID
    rooted = export_dicom(
        archive.uri,
        str(row.sop_instance_uid),
        str(tmp_path / "c.dcm"),
        uid_prefix="1.2.826.0.1.3680043.10.1.",
    )
    assert rooted.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.1.")


def test_already_lossy_source_keeps_its_history(tmp_path: Path) -> None:
    image = small_pngs(1, side=64)[0]
    dataset = synthetic_dicom(image, "was-jpeg", patient=PATIENT)
    dataset.LossyImageCompression = "01"
    dataset.LossyImageCompressionRatio = "8.5"
    dataset.LossyImageCompressionMethod = "ISO_10918_1"
    data = dicom_bytes(dataset)
    archive = Archive(str(tmp_path / "a.zarr"))
    source = SourceImage("mem://x", read_dicom(data), len(data), "00" * 32)
    row = archive_instance(archive, source, CHEAP, CONTEXT)
    out = tmp_path / "out.dcm"
    export_dicom(archive.uri, str(row.sop_instance_uid), str(out))
    exported = read_back(out)
    assert list(exported.LossyImageCompressionMethod) == ["ISO_10918_1", METHOD]
    assert float(exported.LossyImageCompressionRatio[0]) == 8.5
    assert exported.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121330"
    assert exported.BitsAllocated == 8 and exported.pixel_array.dtype == np.uint8
    assert exported.PatientName == PATIENT.name  # the export is for clinical use: identity kept


def test_jpeg2000_derived_source_exports(tmp_path: Path) -> None:
    archive = Archive(str(tmp_path / "a.zarr"))
    source = read_uri(str(RG3))
    small = replace(source, dicom=cropped(source.dicom, 64))
    row = archive_instance(archive, small, CHEAP, CONTEXT)
    out = tmp_path / "rg3.dcm"
    export_dicom(archive.uri, str(row.sop_instance_uid), str(out))
    exported = read_back(out)
    assert_header_kept(small.dicom.header, exported, {"Rows", "Columns"})
    assert exported.Rows == exported.Columns == 64
    assert list(exported.ImageType) == ["DERIVED", "PRIMARY"]


def test_incomplete_or_foreign_arrays_are_refused() -> None:
    with pytest.raises(ExportError, match="not a Radiarc"):
        export_dataset({"foo": 1}, np.zeros((4, 4), np.uint8))
    with pytest.raises(ExportError, match="interrupted"):
        export_dataset({"radiarc": {"complete": False}, "dicom": {}}, np.zeros((4, 4), np.uint8))


def test_cli_export_local(archived: tuple[Archive, ManifestRow], tmp_path: Path) -> None:
    archive, row = archived
    out = tmp_path / "cli.dcm"
    result = runner.invoke(app, ["export", archive.uri, str(row.sop_instance_uid), str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and read_back(out).LossyImageCompression == "01"
    missing = runner.invoke(app, ["export", archive.uri, "1.2.3.4.5", str(tmp_path / "x.dcm")])
    assert missing.exit_code == 2 and "not in the archive" in missing.output
    hostile = runner.invoke(app, ["export", archive.uri, "../../etc", str(tmp_path / "y.dcm")])
    assert hostile.exit_code == 2 and "not a DICOM UID" in hostile.output
    nowhere = runner.invoke(app, ["export", str(tmp_path / "none"), "1.2", str(tmp_path / "z.dcm")])
    assert nowhere.exit_code == 2 and "no Radiarc archive" in nowhere.output
    assert not (tmp_path / "x.dcm").exists() and not (tmp_path / "y.dcm").exists()


def test_export_help_documents_arguments() -> None:
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    for word in ("ARCHIVE", "UID", "OUT", "--uid-prefix", "--endpoint-url"):
        assert word in result.output.upper() or word in result.output


def test_cli_export_from_s3(s3_bucket: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    bucket, options = s3_bucket
    archive = Archive(f"s3://{bucket}/archive", options)
    image = small_pngs(1, side=48)[0]
    data = dicom_bytes(synthetic_dicom(image, "s3-export", patient=PATIENT))
    row = archive_instance(
        archive, SourceImage("s3://x/y", read_dicom(data), len(data), "0" * 64), CHEAP, CONTEXT
    )
    out = tmp_path / "s3.dcm"
    result = runner.invoke(
        app,
        [
            "export",
            archive.uri,
            str(row.sop_instance_uid),
            str(out),
            "--endpoint-url",
            options["endpoint_url"],
        ],
    )
    assert result.exit_code == 0, result.output
    exported = read_back(out)
    assert (
        exported.Rows == 48
        and exported.SourceImageSequence[0].ReferencedSOPInstanceUID == row.sop_instance_uid
    )


def test_a_lossless_archive_exports_the_original_instance(tmp_path: Path) -> None:
    """Archived with ``max_error=0``: the export is the original SOP instance with its exact
    pixels, nothing marked lossy or derived."""
    archive = Archive(str(tmp_path / "archive.zarr"))
    settings = ArchiveSettings(rate=RateControl(max_error=0))
    row = archive_instance(archive, read_uri(str(MONO1)), settings, CONTEXT)
    assert row.status == "archived" and row.max_abs_error == 0, row.reason
    out = tmp_path / "lossless.dcm"
    export_dicom(archive.uri, str(row.sop_instance_uid), str(out))
    exported, original = read_back(out), read_dicom(MONO1)
    assert exported.SOPInstanceUID == original.header.SOPInstanceUID
    assert exported.file_meta.MediaStorageSOPInstanceUID == exported.SOPInstanceUID
    np.testing.assert_array_equal(exported.pixel_array, original.image.pixels)
    assert_header_kept(original.header, exported)
    assert "LossyImageCompression" not in exported and "DerivationCodeSequence" not in exported
