"""Storage benchmark: scan and read throughput of a DICOM export, manifest query time.

    python -m storage.bench [--files 2000] [--side 128] [--rows 100000] [--threads 8]

Writes an export of ``--files`` small synthetic DICOMs (``--side`` pixels square, 12 bits in
16, fresh UIDs, crops of a NIH chest X-ray) to a temporary directory and to moto's S3 server
started in this process on 127.0.0.1, then measures, for each store:

- scan: listing plus the content sniff (and, locally, a SHA-256 of every file; on S3 the ETag
  of the listing serves);
- read: fetching every file and decoding it with pydicom (what archiving does before the
  codec), on one thread and on ``--threads`` threads.

It then writes ``--rows`` synthetic manifest rows (in parts of 5,000, as a run's batches would
be) locally and to S3, and times the resume query (:func:`storage.manifest.done_instances`),
the audit summary, a below-SSIM list and a SQL aggregate. Results print as Markdown tables
(docs/storage.md). Needs moto (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from codec.io import GrayImage, read_png
from storage.audit import below, connect, query, summary
from storage.fsutil import StorageOptions, open_fs
from storage.manifest import ManifestRow, ManifestWriter, done_instances
from storage.scan import ScanItem, scan
from storage.source import read_source
from storage.synth import crops, write_export

PNG = Path(__file__).resolve().parents[1] / "tests" / "data" / "00007617_000.png"
PART_ROWS = 5000
_DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_SESSION_TOKEN": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def dummy_aws_credentials() -> Iterator[None]:
    """Dummy AWS credentials in the environment (subprocesses inherit them), restored after."""
    saved = {name: os.environ.get(name) for name in _DUMMY_AWS}
    os.environ.update(_DUMMY_AWS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with dummy credentials; yields its endpoint URL."""
    from storage.faults import RestartableMotoServer

    with dummy_aws_credentials():
        server = RestartableMotoServer().start()
        try:
            yield server.url
        finally:
            server.stop()


def timed(action: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def bench_export(uri: str, options: StorageOptions, threads: int) -> list[dict[str, Any]]:
    """Scan and read throughput of the export at ``uri``."""
    fs, _ = open_fs(uri, options)
    items, scan_seconds = timed(lambda: list(scan(uri, options)))
    total = sum(item.size for item in items)
    results = [_throughput("scan", len(items), total, scan_seconds)]
    if fs.protocol == "file" or "file" in fs.protocol:
        _, bare = timed(lambda: list(scan(uri, options, hash_content=False)))
        results.append(_throughput("scan, no hashing", len(items), total, bare))

    def read(item: ScanItem) -> int:
        return int(read_source(fs, item).dicom.image.pixels.size)

    _, one = timed(lambda: [read(item) for item in items])
    results.append(_throughput("read + decode, 1 thread", len(items), total, one))
    with ThreadPoolExecutor(threads) as pool:
        _, many = timed(lambda: list(pool.map(read, items)))
    results.append(_throughput(f"read + decode, {threads} threads", len(items), total, many))
    return results


def _throughput(step: str, files: int, n_bytes: int, seconds: float) -> dict[str, Any]:
    return {
        "step": step,
        "files": files,
        "seconds": seconds,
        "files_per_s": files / seconds,
        "mb_per_s": n_bytes / 1e6 / seconds,
    }


def synthetic_rows(count: int, run_id: str, seed: int = 0) -> Iterator[ManifestRow]:
    """Plausible manifest rows: 97% archived, the rest skipped or failed."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for index in range(count):
        status = rng.choices(["archived", "skipped", "failed"], [97, 2, 1])[0]
        archived = status == "archived"
        archived_bytes = rng.randint(40_000, 400_000) if archived else None
        yield ManifestRow(
            run_id=run_id,
            status=status,
            timestamp=start + timedelta(seconds=index),
            worker=f"worker-{index % 8}",
            reason=None
            if archived
            else rng.choice(["not DICOM", "multi-frame image", "RuntimeError"]),
            source_uri=f"s3://pacs/export/{index // 1000:04d}/{index}.dcm",
            source_checksum=f"etag:{index:032x}",
            source_bytes=rng.randint(2_000_000, 9_000_000),
            study_instance_uid=f"1.2.826.0.1.{index // 4}",
            series_instance_uid=f"1.2.826.0.1.{index // 4}.1",
            sop_instance_uid=f"1.2.826.0.1.{index // 4}.1.{index}" if status != "skipped" else None,
            patient_key=f"{rng.getrandbits(256):064x}",
            modality=rng.choice(["CR", "DX"]),
            body_part=rng.choice(["CHEST", "HAND", "KNEE", None]),
            rows=2048,
            columns=2048,
            bits_stored=12,
            photometric="MONOCHROME2",
            pixel_bytes=2048 * 2048 * 2,
            archived_bytes=archived_bytes,
            metadata_bytes=6_000 if archived else None,
            ratio=2048 * 2048 * 2 / archived_bytes if archived_bytes else None,
            bpp=archived_bytes * 8 / 2048**2 if archived_bytes else None,
            psnr=rng.uniform(35, 55) if archived else None,
            ssim=rng.uniform(0.9, 1.0) if archived else None,
            ms_ssim=rng.uniform(0.95, 1.0) if archived else None,
            max_abs_error=rng.randint(5, 200) if archived else None,
            iterations=4.0 if archived else None,
            model_id="rnnconv-pool-v1",
            codec_key="0123456789abcdef",
            total_seconds=rng.uniform(1, 5),
        )


def bench_manifest(archive: str, options: StorageOptions, rows: int) -> list[dict[str, Any]]:
    """Write ``rows`` rows, then time the queries an operator and an auditor run."""
    _, write_seconds = timed(lambda: _write_rows(archive, options, rows))
    results = [
        {"query": f"write {rows:,} rows ({rows // PART_ROWS} parts)", "seconds": write_seconds}
    ]
    done, seconds = timed(lambda: done_instances(archive, "0123456789abcdef", options))
    results.append(
        {"query": f"done_instances ({len(done.sop_instance_uids):,} done)", "seconds": seconds}
    )
    connection, seconds = timed(lambda: connect(archive, options))
    results.append({"query": "connect (register dataset)", "seconds": seconds})
    _, seconds = timed(lambda: summary(connection))
    results.append({"query": "audit summary (totals, percentiles, failures)", "seconds": seconds})
    listed, seconds = timed(lambda: below(connection, ssim=0.905))
    results.append({"query": f"below SSIM 0.905 ({listed.num_rows:,} rows)", "seconds": seconds})
    _, seconds = timed(
        lambda: query(
            connection,
            "SELECT modality, body_part, avg(ratio), count(*) FROM manifest GROUP BY ALL",
        )
    )
    results.append({"query": "SQL: ratio per modality and body part", "seconds": seconds})
    return results


def _write_rows(archive: str, options: StorageOptions, rows: int) -> None:
    with ManifestWriter(archive, "bench", storage_options=options, batch_rows=PART_ROWS) as writer:
        for row in synthetic_rows(rows, "bench"):
            writer.add(row)


def export_images(count: int, side: int) -> list[GrayImage]:
    """Distinct 12-bit crops (8-bit NIH pixels widened, low bits noise)."""
    source = read_png(PNG)
    rng = np.random.default_rng(1)
    images = []
    for crop in crops(source, side, min(count, 64)):
        widened = crop.pixels.astype(np.uint16) << 4 | rng.integers(
            0, 16, crop.pixels.shape, dtype=np.uint16
        )
        images.append(GrayImage(widened, 12))
    return images


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    import s3fs

    images = export_images(args.files, args.side)
    with tempfile.TemporaryDirectory() as temporary, moto_server() as endpoint:
        options = {"endpoint_url": endpoint}
        local = str(Path(temporary) / "export")
        _, seconds = timed(lambda: write_export(local, images, count=args.files, per_study=4))
        print(f"wrote {args.files} DICOMs of {args.side}x{args.side} locally in {seconds:.1f} s")
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("bench")
        _, seconds = timed(lambda: fs.put(local + "/", "bench/export/", recursive=True))
        print(f"uploaded them to the S3 server in {seconds:.1f} s\n")
        throughput = []
        for where, uri, opts in (
            ("local disk", local, {}),
            ("S3 (moto)", "s3://bench/export", options),
        ):
            for result in bench_export(uri, opts, args.threads):
                throughput.append({"store": where, **result})
        print(
            markdown(throughput, ["store", "step", "files", "seconds", "files_per_s", "mb_per_s"])
        )
        queries = []
        for where, uri, opts in (
            ("local disk", str(Path(temporary) / "archive"), {}),
            ("S3 (moto)", "s3://bench/archive", options),
        ):
            for result in bench_manifest(uri, opts, args.rows):
                queries.append({"store": where, **result})
        print()
        print(markdown(queries, ["store", "query", "seconds"]))


if __name__ == "__main__":
    main()
