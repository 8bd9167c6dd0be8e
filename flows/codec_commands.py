"""``radiarc encode``, ``decode``, ``info``, ``train``: thin wrappers over codec/ and storage/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from codec import bitstream
from codec.bitstream import BitstreamError
from codec.coarse import segment_parameters
from codec.io import ImageError, write_png
from codec.learned import decode_image, encode_image
from codec.metrics import bits_per_pixel, measure
from codec.rate import RateControl
from codec.residual import layer_bound, smoothed
from codec.weights import DEFAULT_MODEL_ID, installed_models

console = Console()


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


def encode(
    src: Annotated[Path, typer.Argument(help="PNG or DICOM image to compress.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the Radiarc stream.")],
    iterations: Annotated[
        int | None, typer.Option(help="Fixed number of iterations for every tile.")
    ] = None,
    bpp: Annotated[
        float | None, typer.Option(help="Largest stream not above this many bits per pixel.")
    ] = None,
    min_ssim: Annotated[
        float | None, typer.Option(help="Quality floor: every tile's SSIM at least this.")
    ] = None,
    min_psnr: Annotated[
        float | None, typer.Option(help="Quality floor: every tile's PSNR (dB) at least this.")
    ] = None,
    max_error: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Near-lossless: no pixel off by more than this many levels (0: lossless); "
            "network iterations plus a residual layer, from 3 levels over a coarse "
            "correction where that is smaller (format 5 stream, 6 with corrections).",
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Model id of the installed weights.")] = (
        DEFAULT_MODEL_ID
    ),
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels (multiple of 16).")] = 512,
    adaptive: Annotated[
        bool,
        typer.Option(
            help="With --bpp: each 16x16 block stops refining once good enough "
            "(spatially adaptive rate; several network runs to meet the target)."
        ),
    ] = False,
    half_res: Annotated[
        bool,
        typer.Option(
            help="With --bpp: a tile may be coded at half resolution and upsampled where that "
            "removes more error per byte (helps most at 0.125 bpp and below; format 3 stream)."
        ),
    ] = False,
    residual: Annotated[
        bool,
        typer.Option(
            help="With --bpp: add a residual layer and keep the smallest max pixel error that "
            "fits: rates above the network's reach (about 1 bpp), up to lossless. Coarse "
            "layers may be smoothed (pixels within twice their quantizer's error; info shows it), "
            "and tiles may take a coarse correction of the network's low-frequency error "
            "(format 6 stream)."
        ),
    ] = False,
    refine_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="Search each iteration's code this many steps for one the decoder decodes "
            "better (8 is a good choice: up to ~1 dB at 0.125 bpp, about 8x the encoding "
            "time; under --residual and --max-error, the codes beneath the layers; with "
            "--adaptive, 16 is better than 8 at every rate and block stops' threshold search "
            "keeps it affordable). The stream and decoder are unchanged.",
        ),
    ] = 0,
) -> None:
    """Compress SRC (PNG or DICOM) into a Radiarc stream at DST; prints what it achieved.

    With no rate option, 4 iterations per tile are kept.
    """
    from storage.images import load_image

    if (iterations, bpp, min_ssim, min_psnr, max_error) == (None,) * 5:
        iterations = 4
    try:
        rate = RateControl(
            iterations,
            bpp,
            min_ssim,
            min_psnr,
            adaptive=adaptive,
            half_res=half_res,
            max_error=max_error,
            residual=residual,
        )
        image = load_image(src)
        result = encode_image(image, rate, model, tile_size, refine_steps)
    except (ValueError, ImageError, BitstreamError) as error:
        raise _fail(str(error)) from error
    dst.write_bytes(result.data)
    decoded = decode_image(result.data)
    quality = measure(image.pixels, decoded.pixels, image.bits_stored)
    table = Table(title=f"{src.name} -> {dst.name} ({rate.describe()})")
    columns = ("bytes", "bpp", "PSNR dB", "SSIM", "MS-SSIM", "max error", "iterations")
    for column in (*columns, "half-res tiles", "target met"):
        table.add_column(column)
    table.add_row(
        str(result.n_bytes),
        f"{bits_per_pixel(result.n_bytes, image.pixels.size):.4f}",
        "lossless" if quality.max_abs_error == 0 else f"{quality.psnr:.2f}",
        f"{quality.ssim:.4f}",
        "-" if quality.ms_ssim is None else f"{quality.ms_ssim:.4f}",
        str(quality.max_abs_error),
        f"{min(result.tile_iterations)}-{max(result.tile_iterations)}",
        f"{sum(result.half_res)} of {len(result.tile_iterations)}",
        "yes" if result.target_met else "NO",
    )
    console.print(table)


def decode(
    src: Annotated[Path, typer.Argument(help="Radiarc stream.")],
    dst: Annotated[Path, typer.Argument(help="PNG to write (8- or 16-bit, as the original).")],
    iterations: Annotated[
        int | None, typer.Option(help="Decode only the first K iterations (coarser, faster).")
    ] = None,
) -> None:
    """Decode the stream SRC to the PNG DST, at the original bit depth."""
    try:
        image = decode_image(src.read_bytes(), iterations=iterations)
    except (OSError, ValueError) as error:
        raise _fail(f"{src}: {error}") from error
    write_png(dst, image)
    console.print(
        f"wrote {dst} ({image.pixels.shape[1]}x{image.pixels.shape[0]}, {image.bits_stored} bits)"
    )


def info(src: Annotated[Path, typer.Argument(help="Radiarc stream.")]) -> None:
    """Describe the stream SRC: model, geometry, bit depth, iterations and bytes per tile."""
    try:
        data = src.read_bytes()
        stream = bitstream.unpack(data)
        corrections = [stream.coarse_segment(index) for index in range(len(stream.tiles))]
        kinds = sorted({segment_parameters(c)[:2] for c in corrections if c is not None})
    except (OSError, BitstreamError) as error:
        raise _fail(f"{src}: {error}") from error
    header = stream.header
    rows, cols = header.tile_grid
    version = bitstream.format_version(stream)
    stops = " (blocks stop refining one by one)" if header.block_stops else ""
    console.print(
        f"format version {version}{stops}, model {header.model_id} "
        f"(weights {header.weights_hash.hex()}; installed: {', '.join(installed_models())})"
    )
    console.print(
        f"{header.width}x{header.height} pixels, {header.bits_stored} bits stored, "
        f"{rows}x{cols} tiles of {header.tile_size}, {len(data)} bytes, "
        f"{bits_per_pixel(len(data), header.width * header.height):.4f} bpp"
    )
    layered = [stream.residual(index) for index in range(len(stream.tiles))]
    coder = stream.residual_coder
    max_errors = sorted(
        {layer_bound(layer[0], layer[1], coder) for layer in layered if layer is not None}
    )
    if max_errors:
        bound = "lossless" if max_errors == [0] else f"max error {'/'.join(map(str, max_errors))}"
        smoothed_tiles = sum(1 for layer in layered if layer and smoothed(layer[0], coder))
        bound += f" ({smoothed_tiles} smoothed)" if smoothed_tiles else ""
        console.print(
            f"residual layer on {len(layered) - layered.count(None)} of {len(layered)} tiles: "
            f"{bound}"
        )
    if kinds:
        console.print(
            f"coarse correction on {len(corrections) - corrections.count(None)} of "
            f"{len(corrections)} tiles: "
            + "; ".join(f"{side}x{side} blocks at step {step}" for side, step in kinds)
        )
    table = Table()
    columns = ("tile", "resolution", "iterations", "bytes per iteration", "coarse bytes")
    for column in (*columns, "residual bytes"):
        table.add_column(column)
    for index, (segments, residual) in enumerate(zip(stream.tiles, layered, strict=True)):
        correction = corrections[index]
        table.add_row(
            str(index),
            "half" if stream.is_half_res(index) else "full",
            str(len(segments)),
            " ".join(str(len(s)) for s in segments),
            "-" if correction is None else str(len(correction)),
            "-" if residual is None else str(len(residual[0])),
        )
    console.print(table)


def train(
    images: Annotated[Path, typer.Argument(help="Folder of training PNGs (8- or 16-bit).")],
    run_dir: Annotated[Path, typer.Argument(help="Where checkpoints and log.jsonl go.")],
    resume: Annotated[bool, typer.Option(help="Continue from RUN_DIR's checkpoint.")] = False,
    minutes: Annotated[float, typer.Option(help="Wall-clock budget.")] = 60.0,
    no_pooling: Annotated[
        bool, typer.Option(help="Toderici-style encoder (no multi-level pooling).")
    ] = False,
    loss: Annotated[
        str,
        typer.Option(
            help="l1 (Toderici), log-mse (minus the mean PSNR over iterations) or "
            "log-mse+ms-ssim (also 10 log10 (1 - MS-SSIM))."
        ),
    ] = "l1",
    hard_fraction: Annotated[
        float, typer.Option(help="Share of each batch cropped around sharp edges (0-1).")
    ] = 0.0,
    block_stop_fraction: Annotated[
        float,
        typer.Option(help="Share of each batch trained with adaptive block stops (0-1)."),
    ] = 0.0,
    priming_steps: Annotated[
        int,
        typer.Option(
            help="Extra encoder and decoder passes on the first iteration (hidden-state priming)."
        ),
    ] = 0,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start a new RUN_DIR from another run's checkpoint (the architecture must "
            "match but for --priming-steps)."
        ),
    ] = None,
) -> None:
    """Train the RNN-Conv codec (see `python -m codec.train --help` for every option)."""
    from codec.train import main as train_main

    argv = [str(images), str(run_dir), "--minutes", str(minutes)]
    argv += ["--loss", loss, "--hard-fraction", str(hard_fraction)]
    argv += ["--block-stop-fraction", str(block_stop_fraction)]
    argv += ["--priming-steps", str(priming_steps)]
    argv += ["--init-from", str(init_from)] if init_from is not None else []
    argv += ["--resume"] if resume else []
    argv += ["--no-pooling"] if no_pooling else []
    train_main(argv)
