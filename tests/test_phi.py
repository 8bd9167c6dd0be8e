"""No patient name, ID or birth date of the test files leaves the archive.

A whole small migration runs here: the real DICOMs (whose patient attributes are treated as
real) and synthetic files of a fictitious patient, stored in a folder named after her, are
scanned, archived, written to a manifest, audited in every format, through the library and
the CLI, and exported. Every manifest value, log record, warning and report is then searched
for each identifying value. The archive itself does hold them (the header is kept for export)
and the exported DICOM does too; that is checked as well, so the search is not vacuous.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import zarr
from storage_helpers import (
    CHEAP,
    LUT,
    MONO1,
    PATIENT,
    REAL_DICOMS,
    RG3,
    cropped,
    phi_values,
    small_pngs,
    synthetic_phi,
    write_local_export,
)
from typer.testing import CliRunner

from flows.cli import app
from storage.archive import Archive, RunContext, archive_instance, archive_item
from storage.audit import below, connect, render, summary
from storage.fsutil import open_fs
from storage.manifest import ManifestWriter, read_manifest
from storage.scan import scan
from storage.source import read_uri

pytestmark = pytest.mark.usefixtures("one_thread_torch")


def test_no_patient_values_in_manifests_logs_or_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = sorted(
        {value for path in REAL_DICOMS for value in phi_values(path)} | set(synthetic_phi())
    )
    assert len(secrets) >= 8 and PATIENT.patient_id in secrets
    # Radiarc's own DEBUG logging is covered; third-party DEBUG logs (fsspec's "open file")
    # name source paths verbatim, so they are left at INFO as in production (docs/storage.md).
    caplog.set_level(logging.DEBUG, logger="storage")
    caplog.set_level(logging.INFO)
    context = RunContext("phi-run", patient_key_secret=b"operator secret")
    archive = Archive(str(tmp_path / "archive.zarr"))
    export = tmp_path / "export"
    write_local_export(export, small_pngs(3, side=48))
    outputs: list[str] = []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs, _ = open_fs(str(export))
        with ManifestWriter(archive.uri, context.run_id) as writer:
            skipped = []
            for item in scan(str(export), on_skip=lambda uri, why: skipped.append((uri, why))):
                writer.add(archive_item(archive, fs, item, CHEAP, context))
            for uri, why in skipped:
                logging.getLogger("test").warning("skipped %s: %s", uri, why)
            for path in (RG3, LUT):  # full size would cost minutes of codec time: crop
                source = read_uri(str(path))
                small = replace(source, dicom=cropped(source.dicom, 64))
                writer.add(archive_instance(archive, small, CHEAP, context))  # LUT: skipped
            lenient = replace(CHEAP, lenient_uids=True)
            writer.add(archive_instance(archive, small, lenient, context))

        table = read_manifest(archive.uri)
        statuses = table["status"].to_pylist()
        assert statuses.count("archived") == 6 and statuses.count("skipped") == 1
        assert sum(1 for key in table["patient_key"].to_pylist() if key) == 6  # MONO1 has no ID
        outputs.append(json.dumps(table.to_pylist(), default=str))
        outputs += [
            part.read_bytes().decode("latin-1")
            for part in (tmp_path / "archive.zarr" / "manifests").rglob("*.parquet")
        ]

        connection = connect(archive.uri)
        for fmt in ("table", "csv", "json"):
            outputs.append(render(summary(connection), fmt))
            outputs.append(render({"below": below(connection, ssim=1.01, psnr=500)}, fmt))
        runner = CliRunner()
        for arguments in (
            ["audit", archive.uri],
            ["audit", archive.uri, "--below-ssim", "1.01", "-f", "json"],
            ["audit", archive.uri, "--sql", "SELECT * FROM manifest", "-f", "csv"],
        ):
            result = runner.invoke(app, arguments)
            assert result.exit_code == 0, result.output
            outputs.append(result.output)
        (sop,) = [
            r["sop_instance_uid"] for r in table.to_pylist() if r["source_uri"].endswith("/chest")
        ]
        exported = tmp_path / "exported.dcm"
        result = runner.invoke(app, ["export", archive.uri, sop, str(exported)])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)

    outputs.append(caplog.text)
    outputs += [str(warning.message) for warning in caught]
    assert "<redacted>" in outputs[0]  # the patient-named folder was redacted in source_uri
    for text in outputs:
        for value in secrets:
            assert value.lower() not in text.lower(), f"a patient value leaked: {text[:200]!r}"

    # Not vacuous: the values are in the protected archive and in the clinical export.
    attrs = zarr.open_array(f"{archive.root}/{archive.locate(sop)}", mode="r").attrs.asdict()
    assert any(value in json.dumps(attrs) for value in phi_values(MONO1))
    assert any(value.encode() in exported.read_bytes() for value in phi_values(MONO1))


def test_no_patient_values_from_a_migration_flow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, prefect_api: str, local_ray: str
) -> None:
    """The whole pipeline (Prefect flow, Ray encoders, report, artifact) over an export with a
    patient-named folder: nothing it writes about the archive names the patient, in its
    outputs or in any log (Python, Prefect, Ray workers)."""
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    from flows.migrate import ARTIFACT_KEY, migrate_flow

    secrets = sorted({value for value in phi_values(MONO1)} | set(synthetic_phi()))
    caplog.set_level(logging.DEBUG, logger="flows")
    caplog.set_level(logging.DEBUG, logger="storage")
    caplog.set_level(logging.INFO)
    export, archive = tmp_path / "export", tmp_path / "archive"
    write_local_export(export, small_pngs(3, side=48))
    settings = {
        "codec": {"tile_size": 64, "rate": {"iterations": 1}},
        "ray": {"workers": 1, "batch_images": 4},
        "report": {"worst_images": 4, "crop": 32},
    }

    summary = migrate_flow(str(export), str(archive), settings=settings)

    assert summary.archived == 4 and summary.not_dicom == 3
    outputs = [repr(summary), caplog.text]
    outputs += [p.read_bytes().decode("latin-1") for p in (archive / "reports").rglob("*.md")]
    outputs += [p.read_bytes().decode("latin-1") for p in archive.rglob("*.parquet")]
    table = read_manifest(str(archive))
    outputs.append(json.dumps(table.drop(["source_uri"]).to_pylist(), default=str))
    assert all("<redacted>" in uri or "legacy" in uri for uri in table["source_uri"].to_pylist())
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None
    outputs.append(str(artifact.data))
    with get_client(sync_client=True) as client:
        outputs += [log.message for log in client.read_logs(limit=200)]
    ray_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    outputs += [p.read_bytes().decode("latin-1") for p in ray_logs.rglob("*") if p.is_file()]
    for text in outputs:
        for value in secrets:
            assert value.lower() not in text.lower(), f"a patient value leaked: {text[:200]!r}"
