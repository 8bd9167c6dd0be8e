"""The ``radiarc`` command line: one typer app, one small function per command.

Commands are thin: they parse arguments, call library code in codec/ or storage/, and print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from codec.weights import DEFAULT_MODEL_ID
from flows import codec_commands, migrate_command, storage_commands

app = typer.Typer(
    name="radiarc",
    help="Radiarc: X-ray archives in zarr, compressed by a learned RNN-Conv codec.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Radiarc: X-ray archives in zarr, compressed by a learned RNN-Conv codec."""


DEFAULT_CODECS = f"jpeg2000,htj2k,jpegxl,jpeg,jpegls,{DEFAULT_MODEL_ID}"
DEFAULT_BPPS = "0.0625,0.125,0.25,0.5,1.0"
IMAGE_SUFFIXES = {".png", ".dcm", ""}


def looks_like_image(path: Path) -> bool:
    """PNG, .dcm, or no extension; a numeric "extension" counts as none (UID-named DICOM)."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix[1:].isdigit()


def expand_image_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders as their PNG, DICOM (.dcm) and extensionless files, sorted."""
    expanded = []
    for path in paths:
        if path.is_dir():
            expanded += sorted(
                child
                for child in path.iterdir()
                if child.is_file() and not child.name.startswith(".") and looks_like_image(child)
            )
        else:
            expanded.append(path)
    return expanded


def parse_bpps(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise typer.BadParameter(f"not a comma-separated list of numbers: {text!r}") from error
    if not values or any(value <= 0 for value in values):
        raise typer.BadParameter(f"bit rates must be positive: {text!r}")
    return values


POINT_LOG_NAME = "points.partial.csv"


@app.command()
def bench(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Image files (PNG or DICOM) or folders; a folder contributes its *.png, *.dcm "
            "and extensionless (or UID-named) files."
        ),
    ],
    codecs: Annotated[
        str,
        typer.Option(
            help="Comma-separated codecs to compare: jpeg2000, htj2k, jpegxl, jpeg, jpegls, "
            "and the installed learned models by id (radiarc info lists them); MODEL_ID+blocks "
            "is that model with spatially adaptive rate (blocks stop refining one by one); "
            "then +half (half-resolution tiles), +refine (refined codes; +refineN: N refinement "
            "steps) and +residual (residual layers), in that order."
        ),
    ] = DEFAULT_CODECS,
    bpp: Annotated[
        str,
        typer.Option(
            help="Comma-separated target bit rates (bits per pixel); each point is the largest "
            "real stream not above its target. For 10- to 16-bit images try 0.25,0.5,1,2,4."
        ),
    ] = DEFAULT_BPPS,
    out: Annotated[
        Path,
        typer.Option(help="Folder for points.csv, summary.md and the psnr/ssim/ms_ssim plots."),
    ] = Path("bench-out"),
    resume: Annotated[
        bool,
        typer.Option(
            help="Keep the points an interrupted run with the same --out already measured "
            f"(saved one by one in {POINT_LOG_NAME}) and measure only the rest."
        ),
    ] = False,
) -> None:
    """Compare classical and learned codecs at target bit rates: PSNR, SSIM, MS-SSIM, BD-rate."""
    from codec.baselines import BASELINES, RateDistortionCodec
    from codec.bench import PointLog, Skip, load_images, run_bench, write_report
    from codec.learned_rd import is_learned_codec_name, learned_codec, learned_codec_names
    from storage.images import load_image

    names = [name.strip() for name in codecs.split(",") if name.strip()]
    unknown = [n for n in names if n not in BASELINES and not is_learned_codec_name(n)]
    if unknown or not names:
        known = [*BASELINES, *learned_codec_names()]
        raise typer.BadParameter(
            f"unknown codec(s) {unknown}; choose from {', '.join(known)} "
            "(+refineN in place of +refine: N refinement steps)",
            param_hint="--codecs",
        )
    targets = parse_bpps(bpp)

    def make(name: str) -> RateDistortionCodec:
        return BASELINES[name]() if name in BASELINES else learned_codec(name)

    skipped: list[Skip] = []
    paths = expand_image_paths(images)
    missing = [path for path in paths if not path.exists()]
    skipped += [Skip(path.name, "no such file or folder") for path in missing]
    loaded = load_images([path for path in paths if path.exists()], load_image, skipped)
    for note in skipped:
        typer.echo(f"skipped {note}", err=True)
    if not loaded:
        typer.echo("no readable images; nothing to bench", err=True)
        raise typer.Exit(code=1)
    log = PointLog(out / POINT_LOG_NAME)
    wanted = {image_name for image_name, _ in loaded}
    done = [
        row
        for row in (log.read() if resume else [])
        if row.image in wanted and row.codec in names and row.target_bpp in targets
    ]
    if done:
        typer.echo(f"resuming: {len(done)} points already measured in {log.path}", err=True)
    log.start(done)
    rows = run_bench(
        loaded,
        [make(name) for name in names],
        targets,
        skipped=skipped,
        progress=True,
        done=done,
        on_row=log.append,
    )
    typer.echo(write_report(rows, skipped, out))
    log.path.unlink()
    typer.echo(f"wrote {out / 'points.csv'}, {out / 'summary.md'} and plots to {out}", err=True)


app.command()(codec_commands.encode)
app.command()(codec_commands.decode)
app.command()(codec_commands.info)
app.command()(codec_commands.train)
app.command()(storage_commands.export)
app.command()(storage_commands.audit)
app.command()(storage_commands.verify)
app.command()(migrate_command.migrate)
app.command()(migrate_command.demo)


if __name__ == "__main__":
    app()
