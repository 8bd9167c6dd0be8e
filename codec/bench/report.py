"""Bench results as files: every point in CSV, means and BD-rates in Markdown, curves as PNG.

Means are taken per codec and target over the images that codec reached; the ``n`` column says
how many, because a mean over fewer images is not comparable. BD-rates are computed per image
(each codec's curve against the reference codec's curve on the same image) and averaged, so
a point missing on one image does not shift another's curve. MS-SSIM BD-rates use
``-10 log10(1 - MS-SSIM)``, which is closer to linear in log rate than MS-SSIM itself.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from codec.bench.bdrate import bd_rate, ms_ssim_db
from codec.bench.run import BenchRow, Skip

__all__ = [
    "CSV_COLUMNS",
    "PLOTTED_METRICS",
    "PointLog",
    "Summary",
    "merge_runs",
    "plot_curves",
    "read_csv",
    "summarize",
    "summary_markdown",
    "write_csv",
    "write_report",
]

CSV_COLUMNS = tuple(field.name for field in dataclasses.fields(BenchRow))
PLOTTED_METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}


def _csv_record(row: BenchRow) -> list[object]:
    return ["" if value is None else value for value in dataclasses.astuple(row)]


def write_csv(rows: Sequence[BenchRow], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(_csv_record(row))


class PointLog:
    """Points appended to a CSV file as they are measured, so an interrupted bench resumes.

    Each row is flushed and fsynced on its own: a run killed mid-row leaves at most one torn
    last line, which :meth:`read` drops.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[BenchRow]:
        """The complete rows logged so far; none if there is no log."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines = lines[:-1]
        return _parse_rows(lines)

    def start(self, rows: Sequence[BenchRow]) -> None:
        """Begin the log afresh with ``rows`` (those kept from an earlier run, or none)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, self.path)

    def append(self, row: BenchRow) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow(_csv_record(row))
            handle.flush()
            os.fsync(handle.fileno())


def read_csv(path: Path) -> list[BenchRow]:
    """Rows back from :func:`write_csv`, to re-render a report without re-running the bench."""
    with path.open(newline="") as handle:
        return _parse_rows(handle)


def _parse_rows(lines: Iterable[str]) -> list[BenchRow]:
    return [
        BenchRow(
            image=record["image"],
            bits_stored=int(record["bits_stored"]),
            codec=record["codec"],
            target_bpp=float(record["target_bpp"]),
            parameter=float(record["parameter"]),
            bytes=int(record["bytes"]),
            bpp=float(record["bpp"]),
            psnr=float(record["psnr"]),
            ssim=float(record["ssim"]),
            ms_ssim=float(record["ms_ssim"]) if record["ms_ssim"] else None,
            encode_seconds=float(record["encode_seconds"]),
            decode_seconds=float(record["decode_seconds"]),
        )
        for record in csv.DictReader(lines)
    ]


def _mean(values: Sequence[float | None]) -> float:
    present = [value for value in values if value is not None and math.isfinite(value)]
    return float(np.mean(present)) if present else math.nan


@dataclass(frozen=True)
class Summary:
    """Means over the images one codec reached at one target bpp."""

    codec: str
    target_bpp: float
    images: int
    bpp: float
    psnr: float
    ssim: float
    ms_ssim: float


def summarize(rows: Sequence[BenchRow]) -> list[Summary]:
    groups: dict[tuple[str, float], list[BenchRow]] = defaultdict(list)
    for row in rows:
        groups[(row.codec, row.target_bpp)].append(row)
    return [
        Summary(
            codec=codec,
            target_bpp=target,
            images=len(group),
            bpp=_mean([row.bpp for row in group]),
            psnr=_mean([row.psnr for row in group]),
            ssim=_mean([row.ssim for row in group]),
            ms_ssim=_mean([row.ms_ssim for row in group]),
        )
        for (codec, target), group in groups.items()
    ]


def _curve(
    rows: Sequence[BenchRow], metric: Callable[[BenchRow], float | None]
) -> tuple[list[float], list[float]]:
    points = sorted((row.bpp, value) for row in rows if (value := metric(row)) is not None)
    return [rate for rate, _ in points], [value for _, value in points]


def mean_bd_rates(
    rows: Sequence[BenchRow], codec: str, reference: str, metric: Callable[[BenchRow], float | None]
) -> tuple[float, int]:
    """Mean per-image BD-rate of ``codec`` against ``reference`` and the images it covers."""
    by_image: dict[tuple[str, str], list[BenchRow]] = defaultdict(list)
    for row in rows:
        by_image[(row.image, row.codec)].append(row)
    values = []
    for image in sorted({row.image for row in rows}):
        if (image, codec) in by_image and (image, reference) in by_image:
            value = bd_rate(
                *_curve(by_image[(image, reference)], metric),
                *_curve(by_image[(image, codec)], metric),
            )
            if math.isfinite(value):
                values.append(value)
    return (float(np.mean(values)) if values else math.nan), len(values)


def _format(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def summary_markdown(
    rows: Sequence[BenchRow], skipped: Sequence[Skip] = (), reference: str = "jpeg2000"
) -> str:
    """The means table, the BD-rate table against ``reference``, and the skip notes."""
    lines = [
        "| codec | target bpp | n | mean bpp | PSNR (dB) | SSIM | MS-SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    codecs = list(dict.fromkeys(row.codec for row in rows))
    order = {codec: index for index, codec in enumerate(codecs)}
    for item in sorted(summarize(rows), key=lambda s: (order[s.codec], s.target_bpp)):
        lines.append(
            f"| {item.codec} | {item.target_bpp:g} | {item.images} | {_format(item.bpp, 4)} "
            f"| {_format(item.psnr, 2)} | {_format(item.ssim, 4)} | {_format(item.ms_ssim, 4)} |"
        )
    lines += [
        "",
        f"BD-rate against {reference} (mean over images; negative = fewer bits at equal "
        "quality; MS-SSIM as -10 log10(1 - MS-SSIM)):",
        "",
        "| codec | BD-rate PSNR | n | BD-rate MS-SSIM | n |",
        "|---|---|---|---|---|",
    ]
    for codec in codecs:
        on_psnr, n_psnr = mean_bd_rates(rows, codec, reference, lambda row: row.psnr)
        on_ms_ssim, n_ms_ssim = mean_bd_rates(
            rows,
            codec,
            reference,
            lambda row: None if row.ms_ssim is None else ms_ssim_db(row.ms_ssim),
        )
        lines.append(
            f"| {codec} | {_format(on_psnr, 1)}% | {n_psnr} "
            f"| {_format(on_ms_ssim, 1)}% | {n_ms_ssim} |"
        )
    if skipped:
        notes = [f"- {note}" for note in skipped]
        if len(notes) > 10:  # keep the tables readable; the notes stay one click away
            notes = ["<details><summary>details</summary>", "", *notes, "", "</details>"]
        lines += ["", f"Not measured ({len(skipped)}):", "", *notes]
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[BenchRow], out_dir: Path) -> list[Path]:
    """One PNG per metric: mean metric against mean bpp, one line per codec."""
    paths = []
    summaries = summarize(rows)
    total = len({row.image for row in rows})
    legend = {}
    for codec in dict.fromkeys(row.codec for row in rows):
        counts = [s.images for s in summaries if s.codec == codec]
        fewest, most = min(counts), max(counts)
        coverage = f"{fewest}" if fewest == most else f"{fewest}-{most}"
        legend[codec] = codec if fewest == total else f"{codec} ({coverage} of {total} images)"
    for metric, label in PLOTTED_METRICS.items():
        figure = Figure(figsize=(6, 4.5), dpi=120)
        axes = figure.subplots()
        for codec in dict.fromkeys(row.codec for row in rows):
            points = sorted((s.bpp, getattr(s, metric)) for s in summaries if s.codec == codec)
            axes.plot(
                [p[0] for p in points], [p[1] for p in points], marker="o", label=legend[codec]
            )
        axes.set_title(f"{label} against rate, mean over images")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("bits per pixel (real bytes)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out_dir / f"{metric}.png"
        figure.savefig(path)
        paths.append(path)
    return paths


def write_report(
    rows: Sequence[BenchRow], skipped: Sequence[Skip], out_dir: Path, reference: str = "jpeg2000"
) -> str:
    """Write points.csv, summary.md and the plots into ``out_dir``; return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "points.csv")
    markdown = summary_markdown(rows, skipped, reference)
    (out_dir / "summary.md").write_text(markdown)
    plot_curves(rows, out_dir)
    return markdown


def merge_runs(runs: Sequence[Sequence[BenchRow]]) -> list[BenchRow]:
    """The rows of several bench runs, restricted to the images every run measured, so that
    means and BD-rates compare codecs on the same images. A codec and target measured by more
    than one run keeps the first run's rows."""
    common = set.intersection(*({row.image for row in rows} for rows in runs))
    merged: list[BenchRow] = []
    seen: set[tuple[str, float]] = set()
    for rows in runs:
        kept = [row for row in rows if row.image in common]
        fresh = {(row.codec, row.target_bpp) for row in kept} - seen
        merged += [row for row in kept if (row.codec, row.target_bpp) in fresh]
        seen |= fresh
    return merged
