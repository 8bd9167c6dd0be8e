"""The benchmark: measured points, BD-rates, report files, and the ``radiarc bench`` command."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codec.baselines import JPEG, JPEG2000, JPEGLS
from codec.bench import BenchRow, Skip, bd_rate, ms_ssim_db, run_bench, write_csv, write_report
from codec.bench.merge import main as merge_main
from codec.bench.report import CSV_COLUMNS, PointLog, merge_runs, read_csv
from codec.io import GrayImage, write_png
from flows.cli import POINT_LOG_NAME, app, expand_image_paths

RATES = [0.1, 0.2, 0.4, 0.8, 1.6]
PSNRS = [36.0, 39.5, 42.5, 45.0, 47.0]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_bd_rate_of_a_curve_against_itself_is_zero() -> None:
    assert bd_rate(RATES, PSNRS, RATES, PSNRS) == pytest.approx(0, abs=1e-9)


def test_bd_rate_of_the_same_quality_at_half_the_rate_is_minus_50_percent() -> None:
    half = [rate / 2 for rate in RATES]
    assert bd_rate(RATES, PSNRS, half, PSNRS) == pytest.approx(-50, abs=1e-6)
    assert bd_rate(half, PSNRS, RATES, PSNRS) == pytest.approx(100, abs=1e-6)


def test_bd_rate_uses_only_the_shared_quality_interval() -> None:
    # the test curve is the reference's own, shifted up by one point: same curve where they meet
    assert bd_rate(RATES[:4], PSNRS[:4], RATES[1:], PSNRS[1:]) == pytest.approx(0, abs=1)
    assert math.isnan(bd_rate(RATES[:2], PSNRS[:2], RATES[3:], PSNRS[3:]))  # no overlap


def test_ms_ssim_db_spreads_values_near_one() -> None:
    assert ms_ssim_db(0.99) == pytest.approx(20)
    assert ms_ssim_db(0.999) == pytest.approx(30)
    assert ms_ssim_db(1.0) == math.inf


@pytest.fixture
def bench_images(xray_8bit: GrayImage, xray_12bit: GrayImage) -> list[tuple[str, GrayImage]]:
    return [("chest-8.png", xray_8bit), ("chest-12.png", xray_12bit)]


def test_run_bench_measures_every_reachable_point_and_notes_the_rest(
    bench_images: list[tuple[str, GrayImage]],
) -> None:
    skipped: list[Skip] = []
    rows = run_bench(bench_images, [JPEG2000(), JPEGLS()], [0.001, 0.5, 1.0], skipped=skipped)
    assert {(row.image, row.codec, row.target_bpp) for row in rows} == {
        (image, codec, target)
        for image in ("chest-8.png", "chest-12.png")
        for codec in ("jpeg2000", "jpegls")
        for target in (0.5, 1.0)
        if not (codec == "jpegls" and image == "chest-12.png")
    }
    for row in rows:
        assert row.bpp == row.bytes * 8 / (256 * 256) <= row.target_bpp
        assert row.bits_stored == (12 if row.image == "chest-12.png" else 8)
        assert 30 < row.psnr < 80 and 0.8 < row.ssim < 1 and row.ms_ssim is not None
        assert row.encode_seconds > 0 and row.decode_seconds > 0
    notes = [str(note) for note in skipped]
    assert any("chest-12.png jpegls" in note and "16-bit frames" in note for note in notes)
    assert any("chest-8.png jpegls @ 0.001 bpp" in note for note in notes)


def test_write_report_writes_csv_markdown_and_plots(
    bench_images: list[tuple[str, GrayImage]], tmp_path: Path
) -> None:
    skipped: list[Skip] = []
    rows = run_bench(bench_images, [JPEG2000(), JPEG()], [0.25, 0.5, 1.0, 2.0], skipped=skipped)
    markdown = write_report(rows, skipped, tmp_path)

    with (tmp_path / "points.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert tuple(records[0]) == CSV_COLUMNS
    for column in ("image", "codec", "parameter", "bytes", "bpp", "psnr", "ssim", "ms_ssim"):
        assert column in CSV_COLUMNS
    for column in ("encode_seconds", "decode_seconds", "target_bpp"):
        assert column in CSV_COLUMNS
    assert len(records) == len(rows) == 16
    assert read_csv(tmp_path / "points.csv") == rows  # a report can be re-rendered from the CSV

    assert (tmp_path / "summary.md").read_text() == markdown
    assert "| codec | target bpp | n | mean bpp | PSNR (dB) | SSIM | MS-SSIM |" in markdown
    assert "| jpeg2000 | 0.25 | 2 |" in markdown
    assert "| jpeg2000 | 0.0% | 2 | 0.0% | 2 |" in markdown
    jpeg_line = next(line for line in markdown.splitlines() if line.startswith("| jpeg | "))
    assert float(jpeg_line.split("|")[2].strip().rstrip("%")) > 0  # JPEG needs more bits
    for metric in ("psnr", "ssim", "ms_ssim"):
        assert (tmp_path / f"{metric}.png").read_bytes().startswith(PNG_SIGNATURE)


def write_pngs(folder: Path, xray_8bit: GrayImage, xray_12bit: GrayImage) -> None:
    folder.mkdir()
    write_png(folder / "chest-8.png", xray_8bit)
    write_png(folder / "chest-12.png", xray_12bit)


def test_cli_bench_runs_on_pngs_and_reports_a_corrupt_file(
    xray_8bit: GrayImage, xray_12bit: GrayImage, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    write_pngs(images, xray_8bit, xray_12bit)
    (images / "corrupt.png").write_bytes(PNG_SIGNATURE + b"not really")
    out = tmp_path / "out"
    arguments = ["bench", str(images), "--codecs", "jpeg2000,jpeg", "--bpp", "0.5,1"]
    result = CliRunner().invoke(app, [*arguments, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| jpeg2000 | 0.5 | 2 |" in result.stdout
    assert "| jpeg | 1 | 2 |" in result.stdout
    assert "corrupt.png" in result.output
    assert sorted(path.name for path in out.iterdir()) == [
        "ms_ssim.png",
        "points.csv",
        "psnr.png",
        "ssim.png",
        "summary.md",
    ]


def test_cli_bench_resumes_an_interrupted_run_without_measuring_its_points_again(
    xray_8bit: GrayImage, xray_12bit: GrayImage, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    write_pngs(images, xray_8bit, xray_12bit)
    out = tmp_path / "out"
    arguments = ["bench", str(images), "--codecs", "jpeg2000", "--bpp", "0.5,1", "--out", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert not (out / POINT_LOG_NAME).exists()  # a finished run leaves no log behind
    first = read_csv(out / "points.csv")
    assert len(first) == 4

    # As if killed after two points and in the middle of writing a third: a torn last line.
    kept = [row for row in first if row.image == "chest-12.png"]  # chest-12 sorts first
    (out / POINT_LOG_NAME).write_text((out / "points.csv").read_text().split("chest-8")[0])
    assert PointLog(out / POINT_LOG_NAME).read() == kept
    with (out / POINT_LOG_NAME).open("a") as handle:
        handle.write("chest-8.png,8,jpeg2000,0.5,12")  # no newline: killed mid-row

    result = CliRunner().invoke(app, [*arguments, "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming: 2 points" in result.output
    second = read_csv(out / "points.csv")
    assert len(second) == 4
    # the kept points are the logged ones, timings and all; the rest were measured again
    assert [row for row in second if row.image == "chest-12.png"] == kept
    assert {(row.image, row.target_bpp) for row in second if row.image == "chest-8.png"} == {
        ("chest-8.png", 0.5),
        ("chest-8.png", 1.0),
    }


def test_cli_bench_rejects_unknown_codecs_and_bad_rates(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(tmp_path), "--codecs", "jpeg2000,webp"])
    assert result.exit_code == 2
    assert "webp" in result.output
    result = runner.invoke(app, ["bench", str(tmp_path), "--bpp", "0.5,-1"])
    assert result.exit_code == 2
    assert "positive" in result.output


def test_cli_bench_fails_cleanly_when_nothing_loads(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "notes.png" in result.output and "no readable images" in result.output


def test_folders_expand_to_png_dicom_and_extensionless_files(tmp_path: Path) -> None:
    for name in ("b.png", "a.DCM", "IM0001", "1.2.840.113619.7", "notes.txt", ".hidden"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    extra = tmp_path / "explicit.jpg"
    found = [path.name for path in expand_image_paths([tmp_path, extra])]
    assert found == ["1.2.840.113619.7", "IM0001", "a.DCM", "b.png", "explicit.jpg"]


def test_cli_bench_help_documents_every_option() -> None:
    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for option in ("--codecs", "--bpp", "--out", "--resume"):
        assert option in result.output
    assert "0.25,0.5,1,2,4" in result.output


def test_merged_runs_compare_codecs_on_the_images_every_run_measured(tmp_path: Path) -> None:
    def row(image: str, codec: str, bpp: float, psnr: float) -> BenchRow:
        return BenchRow(image, 8, codec, bpp, 1.0, int(bpp * 8192), bpp, psnr, 0.9, 0.99, 1, 1)

    full = [
        row(image, codec, bpp, 40 + bpp)
        for image in ("a.png", "b.png", "c.png")
        for codec in ("jpeg2000", "learned")
        for bpp in (0.25, 0.5, 1.0)
    ]
    subset = [
        row(image, codec, bpp, 30 + bpp)
        for image in ("b.png", "c.png")
        for codec in ("jpeg2000", "learned+refine")
        for bpp in (0.25, 0.5, 1.0)
    ]
    merged = merge_runs([full, subset])
    assert {r.image for r in merged} == {"b.png", "c.png"}
    assert {r.codec for r in merged} == {"jpeg2000", "learned", "learned+refine"}
    assert all(r.psnr > 40 for r in merged if r.codec == "jpeg2000")  # the first run's rows
    assert len(merged) == 2 * 3 * 3

    write_csv(full, tmp_path / "full.csv")
    write_csv(subset, tmp_path / "subset.csv")
    out = tmp_path / "merged"
    merge_main([str(tmp_path / "full.csv"), str(tmp_path / "subset.csv"), "--out", str(out)])
    assert read_csv(out / "points.csv") == merged
    assert "| learned+refine | 0.25 | 2 |" in (out / "summary.md").read_text()
