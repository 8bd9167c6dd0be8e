"""Migration benchmark: the whole flow over a synthetic export, with 1 and 2 encoders.

    python -m flows.bench [--images 500] [--side 256] [--workers 1,2] [--iterations 4]
                          [--tile 256] [--out docs/bench/flows]

Builds an export of ``--images`` DICOMs (``--side`` pixels square, 8-bit crops of the NIH test
X-rays, fresh UIDs; storage/synth.py), then migrates it into a fresh local archive once per
encoder count, with a local Ray and Prefect's ephemeral API, exactly as ``radiarc migrate``
does. Reported per run: images per minute, source and pixel MB/s, tiles per second, the peak
memory of the driver and of an encoder, and how the encoders' time splits between read,
encode, write and verify. A tile profile adds, for one full 512x512 tile on one CPU thread,
the network's and the entropy coder's share of encoding and the network's floating-point
operations per iteration (torch's FlopCounterMode): the basis of the GPU estimates in
docs/flows.md. Writes ``results.json`` and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codec import entropy
from codec.io import GrayImage, read_png
from codec.weights import load_model
from flows.migrate_command import prepare_prefect_environment
from storage.synth import crops, write_export

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def build_export(root: Path, images: int, side: int) -> int:
    """``images`` DICOM files of distinct crops; returns their total bytes."""
    pngs = [read_png(path) for path in sorted(DATA.glob("*.png"))]
    pool: list[GrayImage] = []
    for index, png in enumerate(pngs):
        pool += list(crops(png, side, max(1, images // len(pngs) + 1), seed=index))
    paths = write_export(str(root), pool[:images], count=images, per_study=4)
    return sum(Path(path).stat().st_size for path in paths)


def tile_profile(side: int = 512, iterations: int = 4, repeats: int = 3) -> dict[str, float]:
    """Seconds per tile (one torch thread) for the network and the entropy coder, and the
    network's FLOPs per tile per iteration, encoder and decoder together."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    loaded = load_model()
    pixels = read_png(DATA / "00007617_000.png").pixels[256 : 256 + side, 256 : 256 + side]
    x = torch.from_numpy(pixels.astype(np.float32)[None, None] / 255 - 0.5)
    loaded.model.compress(x, 1)  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        codes, _ = loaded.model.compress(x, iterations)
    network = (time.perf_counter() - started) / repeats
    bits = [(code > 0).to(torch.uint8).numpy()[0] for code in codes]
    started = time.perf_counter()
    for _ in range(repeats):
        segments, previous = [], None
        for k, plane in enumerate(bits):
            segments.append(entropy.encode_iteration(plane, previous, k, loaded.tables))
            previous = plane
    coding = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        previous = None
        for k, segment in enumerate(segments):
            previous, _ = entropy.decode_iteration(
                segment, bits[k].shape, previous, k, loaded.tables
            )
    entropy_decode = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        loaded.model.decompress([code for code in codes])
    decode = (time.perf_counter() - started) / repeats
    # One iteration after the first: a primed model's first iteration also runs its priming.
    flops = []
    for count in (1, 2):
        with FlopCounterMode(display=False) as counter:
            loaded.model.compress(x, count)
        flops.append(counter.get_total_flops())
    return {
        "tile_side": side,
        "iterations": iterations,
        "network_encode_seconds": network,
        "entropy_coding_seconds": coding,
        "entropy_decoding_seconds": entropy_decode,
        "network_decode_seconds": decode,
        "flops_per_iteration": float(flops[1] - flops[0]),
        "parameters": float(sum(p.numel() for p in loaded.model.parameters())),
    }


def image_profile(repeats: int = 2) -> dict[str, float]:
    """CPU seconds of the per-image work around the network, on a real radiograph (RG3: CR,
    1760x1760, 10 bits, JPEG 2000 lossless): decoding the DICOM, the verification metrics
    (PSNR, SSIM, MS-SSIM) and the per-tile floor check, per megapixel."""
    from codec.metrics import measure
    from codec.rate import RateControl, check_floor
    from storage.dicom import read_dicom

    data = (DATA / "RG3_J2KR.dcm").read_bytes()
    started = time.perf_counter()
    for _ in range(repeats):
        image = read_dicom(data).image
    read = (time.perf_counter() - started) / repeats
    noisy = np.clip(image.pixels.astype(np.int32) + 3, 0, image.peak).astype(image.pixels.dtype)
    started = time.perf_counter()
    measure(image.pixels, noisy, image.bits_stored)
    metrics = time.perf_counter() - started
    started = time.perf_counter()
    check_floor(image.pixels, noisy, image.bits_stored, 512, RateControl(min_ssim=0.9))
    floor = time.perf_counter() - started
    megapixels = image.pixels.size / 1e6
    return {
        "megapixels": megapixels,
        "source_megabytes": len(data) / 1e6,
        "dicom_decode_seconds_per_mp": read / megapixels,
        "metrics_seconds_per_mp": metrics / megapixels,
        "floor_check_seconds_per_mp": floor / megapixels,
    }


def run_migration(
    export: Path, archive: Path, workers: int, iterations: int, tile: int
) -> dict[str, Any]:
    from flows.migrate import migrate_flow

    settings = {
        "codec": {"tile_size": tile, "rate": {"iterations": iterations}},
        "ray": {
            "workers": workers,
            "cpus_per_worker": 2 / workers,
            "torch_threads": 1,
            "batch_images": 8,
            "tile_batch": 8,
            "local_cpus": 2,
        },
        "manifest": {"flush_rows": 256},
    }
    summary = migrate_flow(str(export), str(archive), settings=settings)
    result = asdict(summary)
    spent = sum(summary.stage_seconds.values()) or 1.0
    result.update(
        images_per_minute=summary.images_per_minute,
        source_mb_per_second=summary.source_mb_per_second,
        pixel_mb_per_second=summary.pixel_bytes / 1e6 / summary.wall_seconds,
        tiles_per_second=summary.tiles / summary.wall_seconds,
        stage_share={stage: s / spent for stage, s in summary.stage_seconds.items()},
    )
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Export: {results['images']} DICOM files, {results['side']}x{results['side']} 8-bit, "
        f"{results['export_bytes'] / 1e6:.1f} MB; {results['iterations']} iterations on "
        f"{results['tile']}-pixel tiles.",
        "",
        "| encoders | wall s | images/min | source MB/s | pixel MB/s | tiles/s "
        "| peak RSS driver / encoder MB | read | encode | write | verify |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        share = run["stage_share"]
        lines.append(
            f"| {len(run['workers'])} | {run['wall_seconds']:.1f} | {run['images_per_minute']:.1f}"
            f" | {run['source_mb_per_second']:.3f} | {run['pixel_mb_per_second']:.3f}"
            f" | {run['tiles_per_second']:.2f} | {run['peak_driver_rss_mb']:.0f} / "
            f"{run['peak_worker_rss_mb']:.0f} | "
            + " | ".join(
                f"{100 * share.get(s, 0):.0f}%" for s in ("read", "encode", "write", "verify")
            )
            + " |"
        )
    profile = results["tile_profile"]
    lines += [
        "",
        f"One {profile['tile_side']}x{profile['tile_side']} tile, {profile['iterations']} "
        "iterations, one CPU thread:",
        "",
        "| network encode s | entropy coding s | network decode s | entropy decoding s "
        "| GFLOP per iteration (encode) | parameters |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {profile['network_encode_seconds']:.3f} | {profile['entropy_coding_seconds']:.3f} "
        f"| {profile['network_decode_seconds']:.3f} | {profile['entropy_decoding_seconds']:.3f} "
        f"| {profile['flops_per_iteration'] / 1e9:.2f} | {profile['parameters'] / 1e6:.2f} M |",
    ]
    image = results["image_profile"]
    lines += [
        "",
        f"Per-image CPU work on a real CR ({image['megapixels']:.1f} MP, "
        f"{image['source_megabytes']:.1f} MB JPEG 2000 lossless), seconds per megapixel:",
        "",
        "| DICOM decode | metrics (PSNR, SSIM, MS-SSIM) | per-tile floor check |",
        "|---:|---:|---:|",
        f"| {image['dicom_decode_seconds_per_mp']:.3f} | {image['metrics_seconds_per_mp']:.3f} "
        f"| {image['floor_check_seconds_per_mp']:.3f} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/flows"))
    args = parser.parse_args()
    prepare_prefect_environment()
    results: dict[str, Any] = {
        "images": args.images,
        "side": args.side,
        "iterations": args.iterations,
        "tile": args.tile,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="radiarc-bench-") as scratch:
        export = Path(scratch) / "export"
        results["export_bytes"] = build_export(export, args.images, args.side)
        for count in [int(n) for n in args.workers.split(",")]:
            archive = Path(scratch) / f"archive-{count}"
            results["runs"].append(
                run_migration(export, archive, count, args.iterations, args.tile)
            )
    results["tile_profile"] = tile_profile(iterations=args.iterations)
    results["image_profile"] = image_profile()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = markdown(results)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
