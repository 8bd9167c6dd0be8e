"""Read throughput of Radiarc zarr arrays, locally and over S3, against JPEG 2000 in zarr.

    python -m codec.bench.zarr_read [--bpp 0.25] [--repeat 2] [--threads N] [--out results.json]

A 2048x2048 8-bit image (four 1024x1024 chest X-rays, 2x2) is stored in 512x512 chunks twice: as
a zarr v3 array with the Radiarc codec at ``--bpp``, and as a zarr v2 array with imagecodecs'
numcodecs ``Jpeg2k`` codec at the JPEG 2000 level whose total size comes closest to Radiarc's
without exceeding it. Each array is read from a local directory and from an S3 API (moto's
server on 127.0.0.1, in this process); the table gives the full-image read in megapixels per
second and the latency of one 512x512 region aligned to the chunks (one chunk) and offset by
half a chunk (four chunks), best of ``--repeat``. The S3 server shares this process (and the
GIL) with the reader, so S3 figures are pessimistic. Reads are timed after one warm-up read,
which loads the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codec.io import read_png
from codec.metrics import bits_per_pixel, psnr
from codec.zarr_codec import RadiarcZarrCodec

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (ROOT.parent / "shared" / "data" / "nih-cxr14" / "val", ROOT / "tests" / "data")
CHUNK = 512
REGIONS = {"aligned": (slice(512, 1024), slice(512, 1024)), "offset": (slice(768, 1280),) * 2}


@dataclass(frozen=True)
class ReadResult:
    codec: str
    store: str
    bpp: float
    psnr_db: float
    full_mp_per_s: float
    region_aligned_ms: float
    region_offset_ms: float


def mosaic() -> np.ndarray:
    """Four 1024x1024 X-rays, 2x2 (the first folder of SOURCES that has PNGs; repeated if
    fewer than four)."""
    paths = next((found for f in SOURCES if (found := sorted(f.glob("*.png"))[:4])), [])
    if not paths:
        raise FileNotFoundError(f"no PNG X-rays in {[str(f) for f in SOURCES]}")
    tiles = [read_png(paths[i % len(paths)]).pixels[:1024, :1024] for i in range(4)]
    return np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])


def jpeg2k_matching(image: np.ndarray, budget: int, threads: int) -> Any:
    """The Jpeg2k codec whose chunks total closest to ``budget`` bytes (bisection on its
    PSNR-target level; OpenJPEG's sizes move in steps, so exact matches are rare)."""
    from imagecodecs.numcodecs import Jpeg2k

    chunks = [
        image[r : r + CHUNK, c : c + CHUNK]
        for r in range(0, image.shape[0], CHUNK)
        for c in range(0, image.shape[1], CHUNK)
    ]

    def codec(level: float) -> Any:
        return Jpeg2k(level=level, numthreads=threads)  # type: ignore[arg-type]  # float works

    def size(level: float) -> int:
        return sum(len(bytes(codec(level).encode(c))) for c in chunks)

    low, high = 10.0, 80.0  # level (dB): low fits, high does not
    for _ in range(12):
        level = (low + high) / 2
        low, high = (level, high) if size(level) <= budget else (low, level)
    return codec(min((low, high), key=lambda level: abs(size(level) - budget)))


METADATA = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}


def stored_bytes(path: Path) -> int:
    """Bytes of the chunks (metadata excluded)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name not in METADATA)


def best_seconds(read: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return min(times)


def time_reads(array: Any, repeat: int) -> tuple[float, float, float]:
    array[REGIONS["aligned"]]  # warm-up: weights, connections
    full = best_seconds(lambda: array[:], repeat)
    aligned = best_seconds(lambda: array[REGIONS["aligned"]], repeat)
    offset = best_seconds(lambda: array[REGIONS["offset"]], repeat)
    return array.size / 1e6 / full, aligned * 1e3, offset * 1e3


def start_s3() -> tuple[str, Callable[[], None]]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", server.stop


def run(bpp: float, repeat: int, threads: int) -> list[ReadResult]:
    import imagecodecs.numcodecs
    import s3fs
    import zarr

    imagecodecs.numcodecs.register_codecs()  # imagecodecs declares no entry points
    image = mosaic()
    results = []
    endpoint, stop = start_s3()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("bench")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            radiarc = Path(scratch) / "radiarc.zarr"
            array = zarr.create_array(
                radiarc, shape=image.shape, chunks=(CHUNK, CHUNK), dtype="uint8",
                serializer=RadiarcZarrCodec(bpp=bpp), compressors=None,
            )  # fmt: skip
            array[:] = image
            jpeg2k = Path(scratch) / "jpeg2k.zarr"
            compressor = jpeg2k_matching(image, stored_bytes(radiarc), threads)
            array = zarr.create_array(
                jpeg2k, shape=image.shape, chunks=(CHUNK, CHUNK), dtype="uint8",
                zarr_format=2, compressors=compressor, filters=None,
            )  # fmt: skip
            array[:] = image
            for name, path in (("radiarc (zarr v3)", radiarc), ("jpeg2000 (zarr v2)", jpeg2k)):
                fs.put(str(path), f"bench/{path.name}", recursive=True)
                stores = {
                    "local": (str(path), None),
                    "S3 (moto, loopback)": (f"s3://bench/{path.name}", {"endpoint_url": endpoint}),
                }
                for store, (url, options) in stores.items():
                    array = zarr.open_array(url, mode="r", storage_options=options)
                    decoded = np.asarray(array[:])
                    speed, aligned, offset = time_reads(array, repeat)
                    results.append(
                        ReadResult(
                            name, store, bits_per_pixel(stored_bytes(path), image.size),
                            psnr(image, decoded, 8), speed, aligned, offset,
                        )
                    )  # fmt: skip
    finally:
        stop()
    return results


def table(results: list[ReadResult]) -> str:
    lines = [
        "| codec | store | bpp | PSNR (dB) | full 2048x2048 read (MP/s) "
        "| 512x512 region, 1 chunk (ms) | 512x512 region, 4 chunks (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.codec} | {r.store} | {r.bpp:.3f} | {r.psnr_db:.2f} | {r.full_mp_per_s:.2f} "
            f"| {r.region_aligned_ms:.0f} | {r.region_offset_ms:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpp", type=float, default=0.25, help="Radiarc's target bit rate")
    parser.add_argument("--repeat", type=int, default=2, help="timed reads per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenJPEG threads")
    parser.add_argument("--out", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    results = run(args.bpp, args.repeat, threads)
    device = "GPU" if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, {threads} thread(s), {device}, bpp target {args.bpp}")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
