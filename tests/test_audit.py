"""Audit queries (storage.audit, ``radiarc audit``) over synthetic manifests, local and S3."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.audit import below, connect, query, render, summary
from storage.manifest import ManifestRow, ManifestWriter

runner = CliRunner()
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def archived(run: str, index: int, psnr: float, ssim: float, modality: str = "CR") -> ManifestRow:
    return ManifestRow(
        run_id=run,
        status="archived",
        timestamp=NOW,
        worker="w1",
        sop_instance_uid=f"1.2.{index}",
        study_instance_uid="1.2",
        series_instance_uid="1.2.0",
        modality=modality,
        rows=100,
        columns=100,
        source_bytes=30_000,
        pixel_bytes=20_000,
        archived_bytes=1_000,
        metadata_bytes=500,
        ratio=20.0,
        bpp=0.8,
        psnr=psnr,
        ssim=ssim,
        iterations=2.0,
        codec_key="k",
    )


def write_manifests(archive: str, options: dict[str, str] | None = None) -> None:
    with ManifestWriter(archive, "run-a", storage_options=options) as writer:
        writer.add(archived("run-a", 1, 40.0, 0.99))
        writer.add(archived("run-a", 2, 30.0, 0.90))
        writer.add(archived("run-a", 3, math.inf, 1.0, "DX"))  # lossless
        for reason in ("not DICOM", "not DICOM", "multi-frame image"):
            writer.add(ManifestRow("run-a", "skipped", NOW, "w1", reason=reason, source_bytes=10))
    with ManifestWriter(archive, "run-b", storage_options=options) as writer:
        writer.add(archived("run-b", 4, 25.0, 0.80))
        writer.add(ManifestRow("run-b", "failed", NOW, "w2", reason="RuntimeError: boom"))


@pytest.fixture
def archive(tmp_path: Path) -> str:
    write_manifests(str(tmp_path))
    return str(tmp_path)


def test_summary_totals_quality_and_failures(archive: str) -> None:
    sections = summary(connect(archive))
    totals = {row["run_id"]: row for row in sections["totals"].to_pylist()}
    assert list(totals) == ["run-a", "run-b", "(all runs)"]
    everything = totals["(all runs)"]
    assert (
        everything["rows"],
        everything["archived"],
        everything["skipped"],
        everything["failed"],
    ) == (8, 4, 3, 1)
    assert everything["instances"] == 4
    assert everything["source_bytes"] == 4 * 30_000 and everything["stored_bytes"] == 4 * 1_500
    assert everything["ratio"] == pytest.approx(20.0) and everything[
        "source_ratio"
    ] == pytest.approx(20.0)
    assert everything["bpp"] == pytest.approx(0.8)
    assert totals["run-b"]["archived"] == 1 and totals["run-b"]["failed"] == 1
    quality = {row["metric"]: row for row in sections["quality"].to_pylist()}
    assert quality["ssim"]["images"] == 4 and quality["ssim"]["min"] == pytest.approx(0.80)
    assert quality["ssim"]["p50"] == pytest.approx(0.945)
    assert quality["psnr"]["max"] == math.inf and quality["ms_ssim"]["images"] == 0
    failures = [(r["status"], r["reason"], r["images"]) for r in sections["failures"].to_pylist()]
    assert failures == [
        ("skipped", "not DICOM", 2),
        ("failed", "RuntimeError: boom", 1),
        ("skipped", "multi-frame image", 1),
    ]


def test_below_lists_the_worst_first(archive: str) -> None:
    connection = connect(archive)
    listed = below(connection, ssim=0.95).to_pylist()
    assert [row["sop_instance_uid"] for row in listed] == ["1.2.4", "1.2.2"]
    by_psnr = below(connection, psnr=35.0)["sop_instance_uid"].to_pylist()
    assert by_psnr == ["1.2.4", "1.2.2"]  # the lossless image (inf dB) is never below
    assert below(connection, ssim=0.5, psnr=26)["sop_instance_uid"].to_pylist() == ["1.2.4"]
    with pytest.raises(ValueError):
        below(connection)


def test_sql_sees_only_the_manifest(archive: str, tmp_path: Path) -> None:
    connection = connect(archive, run_id="run-a")
    result = query(
        connection,
        "SELECT modality, count(*) AS n FROM manifest WHERE status = 'archived' "
        "GROUP BY 1 ORDER BY 1",
    )
    assert result.to_pylist() == [{"modality": "CR", "n": 2}, {"modality": "DX", "n": 1}]
    outside = tmp_path / "outside.csv"
    for sql in (
        f"SELECT * FROM read_csv('{outside}')",
        f"COPY (SELECT 1) TO '{outside}'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT * FROM 's3://bucket/x.parquet'",
        "SET enable_external_access = true",
    ):
        with pytest.raises(duckdb.Error):
            query(connection, sql)
    assert not outside.exists()


def test_render_formats(archive: str) -> None:
    sections = summary(connect(archive))
    table = render(sections, "table")
    assert table.startswith("totals\n") and "quality\n" in table and "failures\n" in table
    assert "(all runs)" in table and "inf" in table
    parsed = json.loads(render(sections, "json"))
    assert set(parsed) == {"totals", "quality", "failures"}
    psnr = next(row for row in parsed["quality"] if row["metric"] == "psnr")
    assert psnr["max"] is None  # JSON has no infinity
    single = json.loads(render({"only": sections["failures"]}, "json"))
    assert isinstance(single, list) and single[0]["reason"] == "not DICOM"
    text = render({"only": sections["totals"]}, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[-1]["run_id"] == "(all runs)" and float(rows[-1]["ratio"]) == 20.0
    assert "# totals" in render(sections, "csv")
    with pytest.raises(ValueError):
        render(sections, "xml")


def test_cli_audit_local(archive: str) -> None:
    result = runner.invoke(app, ["audit", archive])
    assert result.exit_code == 0, result.output
    assert "totals" in result.output and "not DICOM" in result.output
    listed = runner.invoke(app, ["audit", archive, "--below-ssim", "0.95", "--format", "csv"])
    assert listed.exit_code == 0
    assert [r["sop_instance_uid"] for r in csv.DictReader(io.StringIO(listed.output))] == [
        "1.2.4",
        "1.2.2",
    ]
    sql = runner.invoke(
        app, ["audit", archive, "--sql", "SELECT count(*) AS n FROM manifest", "-f", "json"]
    )
    assert json.loads(sql.output) == [{"n": 8}]
    run = runner.invoke(
        app,
        [
            "audit",
            archive,
            "--run",
            "run-b",
            "-f",
            "json",
            "--sql",
            "SELECT count(*) AS n FROM manifest",
        ],
    )
    assert json.loads(run.output) == [{"n": 2}]
    bad_sql = runner.invoke(app, ["audit", archive, "--sql", "SELEC nonsense"])
    assert bad_sql.exit_code == 2 and "error" in bad_sql.output
    bad_format = runner.invoke(app, ["audit", archive, "--format", "xml"])
    assert bad_format.exit_code != 0


def test_cli_audit_help_documents_options() -> None:
    result = runner.invoke(app, ["audit", "--help"])
    assert result.exit_code == 0
    for option in ("--below-ssim", "--below-psnr", "--sql", "--format", "--run", "--endpoint-url"):
        assert option in result.output


def test_empty_archive_has_an_empty_summary(tmp_path: Path) -> None:
    sections = summary(connect(str(tmp_path)))
    assert sections["totals"].to_pylist()[0]["rows"] == 0
    assert sections["failures"].num_rows == 0


def test_cli_audit_on_s3(s3_bucket: tuple[str, dict[str, str]]) -> None:
    bucket, options = s3_bucket
    archive = f"s3://{bucket}/archive"
    write_manifests(archive, options)
    endpoint = options["endpoint_url"]
    result = runner.invoke(app, ["audit", archive, "--endpoint-url", endpoint, "-f", "json"])
    assert result.exit_code == 0, result.output
    totals = json.loads(result.output)["totals"]
    assert totals[-1]["rows"] == 8 and totals[-1]["archived"] == 4
    listed = runner.invoke(
        app, ["audit", archive, "-o", f"endpoint_url={endpoint}", "--below-psnr", "35", "-f", "csv"]
    )
    assert listed.exit_code == 0 and "1.2.4" in listed.output
