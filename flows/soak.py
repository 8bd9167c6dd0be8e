"""Soak run: one long migration of thousands of real radiographs, watching memory and pace.

    python -m flows.soak [--images 5000] [--iterations 2] [--workers 2] [--every 15]
                         [--out docs/bench/soak] [--keep DIR]

Builds an export of ``--images`` copies of the real DICOM files shipped in tests/data (the
440x440 10-bit chest in ACR-NEMA form for most, with every 50th a copy of one of the two
3-megapixel files, JPEG-lossless and JPEG 2000-lossless), each with new Study/Series/SOP
Instance UIDs, then migrates it into a fresh local archive with a local Ray and Prefect's
ephemeral API, exactly as ``radiarc migrate`` does. Every ``--every`` seconds it records the
files settled, the driver's and the encoders' resident memory, and the pace since the last
sample. At the end it checks that nothing was lost: one ``archived`` row per image and
exactly those arrays marked complete. Writes ``samples.csv``, ``summary.md`` and
``soak.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from flows.faultkit import encoder_pids
from flows.progress import ProgressSink, reporting
from storage.invariants import complete_instances
from storage.manifest import read_manifest
from storage.uids import derived_uid

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SMALL = "CR-MONO1-10-chest.dcm"
LARGE = ("CR-ModalitySequenceLUT.dcm", "RG3_J2KR.dcm")


def build_export(root: Path, images: int, per_study: int = 4) -> int:
    """``images`` copies of the real files with fresh UIDs; returns their total bytes."""
    originals = {name: pydicom.dcmread(DATA / name, force=True) for name in (SMALL, *LARGE)}
    total = 0
    for index in range(images):
        name = LARGE[(index // 50) % 2] if index % 50 == 49 else SMALL
        dataset = originals[name]
        study = index // per_study
        dataset.StudyInstanceUID = derived_uid(f"soak:study:{study}", "study")
        dataset.SeriesInstanceUID = derived_uid(f"soak:study:{study}", "series")
        dataset.SOPInstanceUID = derived_uid(f"soak:{index}", "sop")
        if "MediaStorageSOPInstanceUID" in getattr(dataset, "file_meta", {}):
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        path = root / f"study{study:05d}" / f"IM{index:06d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(path, enforce_file_format=False)
        total += path.stat().st_size
    return total


def rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _Counts(ProgressSink):
    def __init__(self) -> None:
        self.settled = 0
        self.counts: dict[str, int] = {}

    def advance(self, files: int, source_bytes: int, counts: dict[str, int]) -> None:
        self.settled += files
        self.counts = dict(counts)


@dataclass
class Sample:
    seconds: float
    settled: int
    images_per_minute: float
    driver_rss_mb: float
    encoders_rss_mb: float


def sample_until(stop: threading.Event, sink: _Counts, every: float, out: list[Sample]) -> None:
    started = time.monotonic()
    last_time, last_settled = started, 0
    while not stop.wait(every):
        now, settled = time.monotonic(), sink.settled
        pace = 60 * (settled - last_settled) / max(now - last_time, 1e-9)
        encoders = sum(rss_mb(pid) for pid in encoder_pids())
        out.append(Sample(now - started, settled, pace, rss_mb(), encoders))
        last_time, last_settled = now, settled


def check_nothing_lost(archive: Path, images: int) -> dict[str, Any]:
    rows = read_manifest(str(archive)).to_pylist()
    archived = Counter(row["sop_instance_uid"] for row in rows if row["status"] == "archived")
    paths = {
        f"{r['study_instance_uid']}/{r['series_instance_uid']}/{r['sop_instance_uid']}"
        for r in rows
        if r["status"] == "archived"
    }
    complete = complete_instances(str(archive))
    return {
        "rows": len(rows),
        "archived_once": sum(1 for count in archived.values() if count == 1),
        "archived_twice_or_more": sum(1 for count in archived.values() if count > 1),
        "not_archived": images - len(archived),
        "complete_arrays": len(complete),
        "complete_equals_archived": complete == paths,
        "statuses": dict(Counter(row["status"] for row in rows)),
    }


def summarise(samples: list[Sample]) -> dict[str, float]:
    """Memory and pace in the first and last quarter of the run (after warm-up)."""
    steady = samples[1:] or samples
    if not steady:
        raise ValueError("no samples: the run was shorter than one sampling interval")
    quarter = max(1, len(steady) // 4)
    first, last = steady[:quarter], steady[-quarter:]
    return {
        "driver_rss_first_quarter_mb": max(s.driver_rss_mb for s in first),
        "driver_rss_last_quarter_mb": max(s.driver_rss_mb for s in last),
        "encoders_rss_first_quarter_mb": max(s.encoders_rss_mb for s in first),
        "encoders_rss_last_quarter_mb": max(s.encoders_rss_mb for s in last),
        "pace_first_quarter": statistics.median(s.images_per_minute for s in first),
        "pace_last_quarter": statistics.median(s.images_per_minute for s in last),
    }


def plot(samples: list[Sample], path: Path) -> None:
    """Pace and memory against files settled: flat lines are what a soak wants to see."""
    import matplotlib.pyplot as plt

    settled = [s.settled for s in samples]
    figure, (pace, memory) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    pace.plot(settled, [s.images_per_minute for s in samples])
    pace.set_ylabel("images / min")
    memory.plot(settled, [s.driver_rss_mb for s in samples], label="driver")
    memory.plot(settled, [s.encoders_rss_mb for s in samples], label="encoders (all)")
    memory.set_ylabel("RSS, MB")
    memory.set_xlabel("files settled")
    memory.set_ylim(bottom=0)
    memory.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(args: argparse.Namespace, result: dict[str, Any]) -> str:
    steady, lost, run = result["steady"], result["lost"], result["run"]
    lines = [
        f"Soak: {args.images} images ({result['export_mb']:.0f} MB of DICOM), "
        f"{args.iterations} iterations, {args.workers} encoders, "
        f"wall {run['wall_seconds'] / 60:.1f} min, {run['images_per_minute']:.0f} images/min.",
        "",
        "| | first quarter | last quarter |",
        "|---|---|---|",
        f"| driver RSS, MB (max) | {steady['driver_rss_first_quarter_mb']:.0f} | "
        f"{steady['driver_rss_last_quarter_mb']:.0f} |",
        f"| encoders RSS, MB (max, all) | {steady['encoders_rss_first_quarter_mb']:.0f} | "
        f"{steady['encoders_rss_last_quarter_mb']:.0f} |",
        f"| images/min (median of samples) | {steady['pace_first_quarter']:.0f} | "
        f"{steady['pace_last_quarter']:.0f} |",
        "",
        f"Manifest: {lost['rows']} rows {lost['statuses']}; archived exactly once: "
        f"{lost['archived_once']}; more than once: {lost['archived_twice_or_more']}; "
        f"not archived: {lost['not_archived']}; arrays marked complete: "
        f"{lost['complete_arrays']} (equal to the archived rows: "
        f"{lost['complete_equals_archived']}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/soak"))
    parser.add_argument("--keep", type=Path, help="build the export and archive here, kept")
    args = parser.parse_args()

    from flows.migrate_command import prepare_prefect_environment

    prepare_prefect_environment()
    from flows.migrate import migrate_flow

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        export, archive = work / "export", work / "archive"
        export_bytes = build_export(export, args.images)
        print(f"export: {args.images} files, {export_bytes / 1e6:.0f} MB", flush=True)
        sink, stop = _Counts(), threading.Event()
        samples: list[Sample] = []
        sampler = threading.Thread(target=sample_until, args=(stop, sink, args.every, samples))
        settings = {
            "codec": {"tile_size": 512, "rate": {"iterations": args.iterations}},
            "ray": {
                "workers": args.workers,
                "cpus_per_worker": 2 / args.workers,
                "torch_threads": 1,
                "local_cpus": 2,
            },
            "report": {"enabled": False},
        }
        sampler.start()
        try:
            with reporting(sink):
                summary = migrate_flow(str(export), str(archive), settings=settings)
        finally:
            stop.set()
            sampler.join()
        result = {
            "export_mb": export_bytes / 1e6,
            "run": {
                "wall_seconds": summary.wall_seconds,
                "images_per_minute": summary.images_per_minute,
                "archived": summary.archived,
                "failed": summary.failed,
            },
            "steady": summarise(samples),
            "lost": check_nothing_lost(archive, args.images),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "samples.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(Sample.__dataclass_fields__)
        for sample in samples:
            writer.writerow([round(value, 2) for value in vars(sample).values()])
    (args.out / "summary.md").write_text(markdown(args, result))
    plot(samples, args.out / "soak.png")
    print(markdown(args, result))


if __name__ == "__main__":
    main()
