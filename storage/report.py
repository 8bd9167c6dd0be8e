"""A migration run's report: Markdown and PNG plots, written into the archive.

Layout: ``ARCHIVE/reports/<run id>/report.md`` beside ``ratio.png``, ``quality.png`` and
``worst-<n>.png``. The report holds the run's totals (images, bytes in and out, ratio, rate,
throughput, where the time went), the ratio and quality distributions, the worst images by SSIM
with original / decoded / difference crops of their worst region, and the images that were
skipped or failed with the reasons.

No patient values: numbers come from the manifest (which holds none, docs/storage.md), images
are named by SOP Instance UID, reasons are the manifest's (already redacted), source URIs are
left out, and the crops of an image whose header says Burned In Annotation ``YES`` are withheld
(burned-in text may name the patient).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.archive import Archive
from storage.audit import connect, summary
from storage.fsutil import StorageOptions, join, write_atomic
from storage.manifest import read_manifest, validate_run_id
from storage.source import read_uri

__all__ = ["REPORTS_DIR", "Report", "RunTotals", "write_report"]

REPORTS_DIR = "reports"
_BURNED_IN = "00280301"
_MAX_LISTED_FAILURES = 50


@dataclass(frozen=True)
class RunTotals:
    """What a run knows beyond its manifest rows: files it never recorded and its timing."""

    run_id: str
    wall_seconds: float
    files_listed: int | None = None
    already_done: int = 0
    settled_skips: int = 0
    not_dicom: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    uri: str
    markdown: str


def write_report(
    archive: Archive,
    totals: RunTotals,
    *,
    source_options: StorageOptions | None = None,
    worst_images: int = 4,
    crop: int = 256,
) -> Report:
    """Build the report of run ``totals.run_id`` from its manifest and write it."""
    run_id = validate_run_id(totals.run_id)
    directory = join(archive.root, REPORTS_DIR, run_id)
    table = read_manifest(archive.uri, archive.storage_options, run_id=run_id)
    sections = summary(connect(archive.uri, archive.storage_options, run_id=run_id))
    archived = table.filter(pc.equal(table["status"], "archived"))
    files: dict[str, bytes] = {}
    lines = [f"# Radiarc migration report: run `{run_id}`", ""]
    lines.append(f"Written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. ")
    lines += [", ".join(f"{key} {value}" for key, value in totals.settings.items()), ""]
    lines += _totals_section(table, totals)
    lines += _time_section(totals)
    if archived.num_rows:
        files["ratio.png"] = _histogram_png(archived, [("ratio", "compression ratio (x:1)")])
        files["quality.png"] = _histogram_png(
            archived, [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("bpp", "bits per pixel")]
        )
        lines += ["## Distributions (archived images)", ""]
        lines += ["![compression ratio](ratio.png)", "", "![quality](quality.png)", ""]
        lines += [*_markdown_table(sections["quality"]), ""]
    worst_lines, worst_files = _worst_section(
        archive, table, worst_images, crop, source_options or {}
    )
    lines += worst_lines
    files.update(worst_files)
    lines += _failures_section(table, sections["failures"], totals)
    markdown = "\n".join(lines).rstrip() + "\n"
    for name, data in files.items():
        write_atomic(archive.fs, join(directory, name), data)
    uri = join(archive.uri.rstrip("/"), REPORTS_DIR, run_id, "report.md")
    write_atomic(archive.fs, join(directory, "report.md"), markdown.encode())
    return Report(uri, markdown)


def _totals_section(table: pa.Table, totals: RunTotals) -> list[str]:
    rows = table.to_pylist()
    archived = [row for row in rows if row["status"] == "archived"]
    count = {
        status: sum(1 for row in rows if row["status"] == status)
        for status in ("archived", "skipped", "failed")
    }
    source_bytes = sum(row["source_bytes"] or 0 for row in rows)
    pixel_bytes = sum(row["pixel_bytes"] or 0 for row in archived)
    chunk_bytes = sum(row["archived_bytes"] or 0 for row in archived)
    stored_bytes = chunk_bytes + sum(row["metadata_bytes"] or 0 for row in archived)
    pixels = sum((row["rows"] or 0) * (row["columns"] or 0) for row in archived)
    wall = max(totals.wall_seconds, 1e-9)
    processed = len(rows)
    items = [
        ("files listed in the export", _int(totals.files_listed)),
        ("archived", _int(count["archived"])),
        ("failed (see below)", _int(count["failed"])),
        ("skipped: cannot be archived (see below)", _int(count["skipped"])),
        ("not DICOM (never recorded)", _int(sum(totals.not_dicom.values()))),
        ("already archived by earlier runs", _int(totals.already_done)),
        ("skipped earlier, not read again", _int(totals.settled_skips)),
        ("source bytes read", _bytes(source_bytes)),
        ("uncompressed pixel bytes archived", _bytes(pixel_bytes)),
        ("stored bytes (chunks + metadata)", _bytes(stored_bytes)),
        ("compression ratio, pixels / chunks", _ratio(pixel_bytes, chunk_bytes)),
        ("bits per pixel", f"{8 * chunk_bytes / pixels:.3f}" if pixels else "-"),
        ("wall time", f"{totals.wall_seconds:.1f} s"),
        ("images per minute", f"{60 * processed / wall:.1f}"),
        ("source MB/s", f"{source_bytes / 1e6 / wall:.2f}"),
    ]
    lines = ["## Totals", "", "| | |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in items]
    return [*lines, ""]


def _time_section(totals: RunTotals) -> list[str]:
    spent = sum(totals.stage_seconds.values())
    if not spent:
        return []
    lines = ["## Where the time went (summed over workers)", "", "| stage | seconds | share |"]
    lines.append("|---|---:|---:|")
    for stage, seconds in totals.stage_seconds.items():
        lines.append(f"| {stage} | {seconds:.1f} | {100 * seconds / spent:.0f}% |")
    return [*lines, ""]


def _histogram_png(table: pa.Table, columns: list[tuple[str, str]]) -> bytes:
    figure, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for axis, (column, label) in zip(axes[0], columns, strict=True):
        values = [v for v in table[column].to_pylist() if v is not None and math.isfinite(v)]
        axis.hist(values, bins=min(30, max(5, len(values) // 3)), color="#4477aa")
        axis.set_xlabel(label)
        axis.set_ylabel("images")
    figure.tight_layout()
    return _png(figure)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _worst_section(
    archive: Archive,
    table: pa.Table,
    count: int,
    crop: int,
    source_options: StorageOptions,
) -> tuple[list[str], dict[str, bytes]]:
    measured = [row for row in table.to_pylist() if row["ssim"] is not None]
    worst = sorted(measured, key=lambda row: (row["ssim"], row["psnr"] or 0.0))[:count]
    if not worst:
        return [], {}
    lines = ["## Worst images (lowest SSIM)", ""]
    lines += ["| # | SOP Instance UID | status | SSIM | PSNR (dB) | ratio | bpp |"]
    lines += ["|---:|---|---|---:|---:|---:|---:|"]
    files: dict[str, bytes] = {}
    figures = []
    for number, row in enumerate(worst, 1):
        lines.append(
            f"| {number} | `{row['sop_instance_uid']}` | {row['status']} | {row['ssim']:.4f} "
            f"| {_number(row['psnr'])} | {_number(row['ratio'])} | {_number(row['bpp'], 3)} |"
        )
        path = f"{row['study_instance_uid']}/{row['series_instance_uid']}/{row['sop_instance_uid']}"
        try:
            png, note = _crop_figure(archive, path, row, crop, source_options)
        except Exception as error:  # a report is no reason to fail a finished run
            png, note = None, f"crops unavailable ({type(error).__name__})"
        if png is not None:
            files[f"worst-{number}.png"] = png
            figures.append(f"![worst image {number}](worst-{number}.png)")
        if note:
            figures.append(f"Image {number}: {note}.")
    return [*lines, "", *[f"{line}\n" for line in figures]], files


def _crop_figure(
    archive: Archive,
    path: str,
    row: dict[str, Any],
    crop: int,
    source_options: StorageOptions,
) -> tuple[bytes | None, str]:
    array = archive.open_array(path)
    attributes: dict[str, Any] = dict(array.attrs.asdict())
    burned = attributes.get("dicom", {}).get(_BURNED_IN, {}).get("Value", [""])
    if str(burned[0] if burned else "").upper() == "YES":
        return None, "crops withheld: the header says the pixels carry burned-in annotation"
    decoded = np.asarray(array[...])
    original = None
    note = ""
    try:
        source = read_uri(attributes["radiarc"]["source"]["uri"], source_options)
        original = source.dicom.image.pixels
        if original.shape != decoded.shape:
            original, note = None, "original not shown (it no longer matches)"
    except Exception:
        note = "original not shown (source unreadable now)"
    bits = int(row["bits_stored"] or 8 * decoded.dtype.itemsize)
    reference = decoded if original is None else original
    error = np.abs(reference.astype(np.float64) - decoded.astype(np.float64))
    top, left, height, width = _worst_window(error, crop)
    window = (slice(top, top + height), slice(left, left + width))
    invert = row["photometric"] == "MONOCHROME1"
    panels = [] if original is None else [("original", _display(original[window], bits, invert))]
    panels.append(("decoded", _display(decoded[window], bits, invert)))
    if original is not None:
        panels.append(("|difference|", error[window]))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), squeeze=False)
    for axis, (title, pixels) in zip(axes[0], panels, strict=True):
        if title == "|difference|":
            shown = axis.imshow(pixels, cmap="magma", vmin=0, vmax=max(1.0, float(pixels.max())))
            figure.colorbar(shown, ax=axis, fraction=0.046, label="grey levels")
        else:
            axis.imshow(pixels, cmap="gray", vmin=0, vmax=1)
        axis.set_title(title)
        axis.axis("off")
    figure.suptitle(f"rows {top}-{top + height}, columns {left}-{left + width}", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    return _png(figure), note


def _display(pixels: np.ndarray, bits: int, invert: bool) -> np.ndarray:
    """Grey levels in 0..1 for display; MONOCHROME1 shown inverted (bright bone)."""
    values = pixels.astype(np.float64) / ((1 << bits) - 1)
    return 1 - values if invert else values


def _worst_window(error: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the ``side`` square (clipped to the image) holding the
    largest squared error, searched on a quarter-side grid."""
    height, width = min(side, error.shape[0]), min(side, error.shape[1])
    integral = np.pad((error * error).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best = (-1.0, 0, 0)
    for top in range(0, error.shape[0] - height + 1, max(1, height // 4)):
        for left in range(0, error.shape[1] - width + 1, max(1, width // 4)):
            total = (
                integral[top + height, left + width]
                - integral[top, left + width]
                - integral[top + height, left]
                + integral[top, left]
            )
            best = max(best, (float(total), top, left))
    return best[1], best[2], height, width


def _failures_section(table: pa.Table, failures: pa.Table, totals: RunTotals) -> list[str]:
    lines = ["## Failures and skipped files", ""]
    rows = failures.to_pylist() + [
        {"status": "not DICOM", "reason": reason, "images": count}
        for reason, count in sorted(totals.not_dicom.items())
    ]
    if not rows:
        return [*lines, "None.", ""]
    lines += ["| status | reason | files |", "|---|---|---:|"]
    lines += [f"| {r['status']} | {_cell(r['reason'])} | {r['images']} |" for r in rows]
    listed = [row for row in table.to_pylist() if row["status"] != "archived"]
    if listed:
        lines += ["", "| status | SOP Instance UID | reason |", "|---|---|---|"]
        for row in listed[:_MAX_LISTED_FAILURES]:
            uid = f"`{row['sop_instance_uid']}`" if row["sop_instance_uid"] else "(not read)"
            lines.append(f"| {row['status']} | {uid} | {_cell(row['reason'])} |")
        if len(listed) > _MAX_LISTED_FAILURES:
            lines.append(f"| ... | {len(listed) - _MAX_LISTED_FAILURES} more | |")
    return [*lines, ""]


def _markdown_table(table: pa.Table) -> list[str]:
    names = table.column_names
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in table.to_pylist():
        lines.append("| " + " | ".join(_number(row[name], 4) for name in names) + " |")
    return lines


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _ratio(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.1f}:1" if denominator else "-"
