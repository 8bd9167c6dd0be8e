"""Run rate-distortion codecs over images at target bit rates and measure every point.

Each point is a real stream: its size in bytes gives the bpp, and its decoded pixels are
scored with :mod:`codec.metrics`. Encode and decode are timed once more at the chosen
parameter, apart from the search that found it. What cannot be measured (an image that does not
load, a codec that cannot take an image, a rate a codec cannot reach) becomes a :class:`Skip`
with its reason, and the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from codec.baselines import CodecUnsupported, RateDistortionCodec, RateUnreachable
from codec.io import GrayImage, ImageError
from codec.metrics import bits_per_pixel, measure

__all__ = ["BenchRow", "Skip", "load_images", "point_key", "run_bench"]


@dataclass(frozen=True)
class BenchRow:
    """One measured point: an image coded by a codec aiming at a target bpp."""

    image: str
    bits_stored: int
    codec: str
    target_bpp: float
    parameter: float
    bytes: int
    bpp: float
    psnr: float
    ssim: float
    ms_ssim: float | None
    encode_seconds: float
    decode_seconds: float


@dataclass(frozen=True)
class Skip:
    """Something not measured, and why; ``codec`` and ``target_bpp`` narrow it when known."""

    image: str
    reason: str
    codec: str | None = None
    target_bpp: float | None = None

    def __str__(self) -> str:
        where = " ".join(
            part
            for part in (
                self.image,
                self.codec or "",
                f"@ {self.target_bpp:g} bpp" if self.target_bpp is not None else "",
            )
            if part
        )
        return f"{where}: {self.reason}"


def load_images(
    paths: Iterable[Path], loader: Callable[[Path], GrayImage], skipped: list[Skip]
) -> list[tuple[str, GrayImage]]:
    """Load every path with ``loader``; files it rejects with ImageError go to ``skipped``."""
    images = []
    for path in paths:
        try:
            images.append((path.name, loader(path)))
        except ImageError as error:
            skipped.append(Skip(path.name, error.reason))
    return images


def measure_point(
    name: str, image: GrayImage, codec: RateDistortionCodec, target_bpp: float
) -> BenchRow:
    """Search ``codec`` for ``target_bpp`` on ``image``, then time and score that stream."""
    data, parameter = codec.encode_at_bpp(image, target_bpp)
    encode_seconds = codec.encode_seconds(image, target_bpp, parameter)
    shape = (image.pixels.shape[0], image.pixels.shape[1])
    start = time.perf_counter()
    decoded = codec.decode(data, shape, image.bits_stored)
    decode_seconds = time.perf_counter() - start
    quality = measure(image.pixels, decoded, image.bits_stored)
    return BenchRow(
        image=name,
        bits_stored=image.bits_stored,
        codec=codec.name,
        target_bpp=target_bpp,
        parameter=parameter,
        bytes=len(data),
        bpp=bits_per_pixel(len(data), image.pixels.size),
        psnr=quality.psnr,
        ssim=quality.ssim,
        ms_ssim=quality.ms_ssim,
        encode_seconds=encode_seconds,
        decode_seconds=decode_seconds,
    )


def point_key(row: BenchRow) -> tuple[str, str, float]:
    """What identifies a point across runs: image, codec and target."""
    return (row.image, row.codec, row.target_bpp)


def run_bench(
    images: Sequence[tuple[str, GrayImage]],
    codecs: Sequence[RateDistortionCodec],
    target_bpps: Sequence[float],
    *,
    skipped: list[Skip] | None = None,
    progress: bool = False,
    done: Sequence[BenchRow] = (),
    on_row: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """Every image through every codec at every target; skips are appended to ``skipped``.

    Points in ``done`` (from an interrupted run) are kept and not measured again; ``on_row``
    sees each new point as soon as it is measured, so a long run can be saved as it goes.
    """
    notes = skipped if skipped is not None else []
    measured = {point_key(row) for row in done}
    rows: list[BenchRow] = list(done)
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    start = time.perf_counter()
    with bar if progress else nullcontext():
        task = bar.add_task("bench", total=len(images) * len(codecs) * len(target_bpps))
        for index, (name, image) in enumerate(images, start=1):
            for codec in codecs:
                bar.update(task, description=f"{name} {codec.name}")
                try:
                    codec.check(image)
                except CodecUnsupported as error:
                    notes.append(Skip(name, str(error), codec.name))
                    bar.advance(task, len(target_bpps))
                    continue
                for target in target_bpps:
                    if (name, codec.name, target) in measured:
                        bar.advance(task)
                        continue
                    try:
                        row = measure_point(name, image, codec, target)
                    except RateUnreachable as error:
                        notes.append(Skip(name, str(error), codec.name, target))
                    else:
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
                    bar.advance(task)
            if progress and not console.is_terminal:
                # A live bar only draws on a terminal; a log file gets one line per image.
                elapsed = time.perf_counter() - start
                console.print(f"bench: {index}/{len(images)} images done, {elapsed:.0f} s")
    return rows
