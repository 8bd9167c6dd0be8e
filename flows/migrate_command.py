"""``radiarc migrate`` and ``radiarc demo``: the migration flow from the command line.

Prefect is imported only when a command runs, after :func:`prepare_prefect_environment` has
given its ephemeral API a writable home and time to start; ``radiarc --help`` stays fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flows.settings import MigrationSettings, refuse_credentials
from flows.storage_commands import EndpointOption, StorageOptionOption, storage_options

if TYPE_CHECKING:
    from flows.migrate import RunSummary

console = Console()

#: What a fresh interpreter runs to read an archived image back with zarr alone.
READ_BACK = """
import sys
import zarr
array = zarr.open_array(sys.argv[1], mode="r")
corner = array[:256, :256]
codec = array.metadata.to_dict()["codecs"][0]["name"]
print(f"plain zarr, fresh process: {array.shape} {array.dtype}, chunks {array.chunks}, "
      f"codec {codec}; top-left 256x256 read, grey levels {int(corner.min())}..{int(corner.max())}")
"""


def prepare_prefect_environment() -> None:
    """Defaults that let Prefect's ephemeral API start anywhere (set before importing it):
    a writable PREFECT_HOME, a generous startup timeout on slow machines, no telemetry,
    and warnings only on the console, where the progress bar is."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if "PREFECT_HOME" not in os.environ:
        home = Path.home() / ".prefect"
        try:
            home.mkdir(parents=True, exist_ok=True)
            writable = os.access(home, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            fallback = Path(tempfile.gettempdir()) / f"radiarc-prefect-{os.getuid()}"
            os.environ["PREFECT_HOME"] = str(fallback)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


def flag_overrides(
    *,
    iterations: int | None = None,
    bpp: float | None = None,
    min_ssim: float | None = None,
    min_psnr: float | None = None,
    max_error: int | None = None,
    adaptive: bool = False,
    half_res: bool = False,
    residual: bool = False,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    batch_images: int | None = None,
    tile_size: int | None = None,
    refine_steps: int | None = None,
    run_id: str | None = None,
    options: dict[str, Any] | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Nested settings from the flags that were given (the others leave env/file values)."""
    rates = {"iterations": iterations, "bpp": bpp, "min_ssim": min_ssim, "min_psnr": min_psnr}
    rates["max_error"] = max_error
    given = {key: value for key, value in rates.items() if value is not None}
    if len(given) > 1:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in given)
        raise typer.BadParameter(
            f"choose one of --iterations, --bpp, --min-ssim, --min-psnr, --max-error (got {flags})"
        )
    overrides: dict[str, Any] = {}
    codec: dict[str, Any] = {}
    if adaptive:
        if bpp is None:
            raise typer.BadParameter("--adaptive needs --bpp (a bit rate to spend block by block)")
        given["adaptive"] = True
    if half_res:
        if bpp is None:
            raise typer.BadParameter("--half-res needs --bpp (a bit rate to spend tile by tile)")
        given["half_res"] = True
    if residual:
        if bpp is None:
            raise typer.BadParameter("--residual needs --bpp (a bit rate to spend tile by tile)")
        given["residual"] = True
    if given:
        codec["rate"] = given
    if tile_size is not None:
        codec["tile_size"] = tile_size
    if refine_steps is not None:
        codec["refine_steps"] = refine_steps
    if codec:
        overrides["codec"] = codec
    ray = {
        "workers": workers,
        "gpus_per_worker": gpus_per_worker,
        "cpus_per_worker": cpus_per_worker,
        "batch_images": batch_images,
    }
    ray = {key: value for key, value in ray.items() if value is not None}
    if ray:
        overrides["ray"] = ray
    if run_id:
        overrides["run_id"] = run_id
    if options:
        overrides["source_options"] = options
        overrides["archive_options"] = options
    if not report:
        overrides["report"] = {"enabled": False}
    return overrides


def run_with_progress(
    source: str, archive: str, overrides: dict[str, Any], config: Path | None
) -> RunSummary:
    """Validate the settings, then run the flow under a live progress bar."""
    try:
        refuse_credentials(overrides, "command-line options")
        MigrationSettings.load(config, overrides)
    except ValidationError as error:  # without the input values: they may be credentials
        problems = "\n".join(
            f"  {'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in error.errors(include_input=False)
        )
        raise _fail(f"invalid settings:\n{problems}") from error
    except (ValueError, OSError) as error:
        raise _fail(f"invalid settings:\n{error}") from error
    prepare_prefect_environment()
    from flows.migrate import migrate_flow
    from flows.progress import RichProgress, reporting

    with RichProgress(console) as bar, reporting(bar):
        return migrate_flow(
            source, archive, settings=overrides, config_file=str(config) if config else None
        )


def summary_table(summary: RunSummary) -> Table:
    """The end-of-run summary: outcomes, bytes, quality, speed, where the report is."""
    table = Table(title=f"Radiarc migration {summary.run_id}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right", overflow="fold")
    listed = "?" if summary.files_listed is None else f"{summary.files_listed:,}"
    ratio = summary.ratio

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        ("files listed", listed),
        ("archived", f"{summary.archived:,}"),
        ("failed", f"{summary.failed:,}"),
        ("skipped (cannot be archived)", f"{summary.skipped:,}"),
        ("not DICOM", f"{summary.not_dicom:,}"),
        ("already archived earlier", f"{summary.already_done:,}"),
        ("source read", f"{summary.source_bytes / 1e6:,.1f} MB"),
        ("stored (chunks + metadata)", f"{summary.stored_bytes / 1e6:,.2f} MB"),
        ("ratio, pixels / stored", "-" if ratio is None else f"{ratio:.1f}:1"),
        ("median PSNR", f"{number(summary.median_psnr, 2)} dB"),
        ("median SSIM", number(summary.median_ssim, 4)),
        ("tiles encoded", f"{summary.tiles:,}"),
        ("wall time", f"{summary.wall_seconds:.1f} s"),
        ("images per minute", f"{summary.images_per_minute:.1f}"),
        ("source MB/s", f"{summary.source_mb_per_second:.2f}"),
        (
            "peak memory, driver / encoder",
            f"{summary.peak_driver_rss_mb:.0f} / {summary.peak_worker_rss_mb:.0f} MB",
        ),
        ("report", summary.report_uri or "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def migrate(
    source: Annotated[
        str, typer.Argument(help="The export: a folder or URI (s3://bucket/prefix).")
    ],
    archive: Annotated[str, typer.Argument(help="The archive: a folder or URI (created if new).")],
    min_ssim: Annotated[
        float | None, typer.Option(help="Quality floor: every tile's SSIM at least this.")
    ] = None,
    min_psnr: Annotated[
        float | None, typer.Option(help="Quality floor: every tile's PSNR (dB) at least this.")
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(help="Fixed codec iterations per tile (the default: 4).")
    ] = None,
    bpp: Annotated[
        float | None,
        typer.Option(
            help="Bits per pixel per image: its chunks share the budget, spent where it removes "
            "the most error."
        ),
    ] = None,
    max_error: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Near-lossless archive: no pixel off by more than this many levels, 0 for "
            "lossless (network iterations plus a residual layer; readers need nothing new).",
        ),
    ] = None,
    adaptive: Annotated[
        bool,
        typer.Option(
            help="With --bpp: 16x16 blocks stop refining once good enough (better quality at "
            "0.125-0.25 bpp; 3-5 network runs per tile to encode)."
        ),
    ] = False,
    half_res: Annotated[
        bool,
        typer.Option(
            help="With --bpp: a tile may be coded at half resolution and upsampled where that "
            "removes more error per byte (better quality near 0.125 bpp; 1.25x the encoding)."
        ),
    ] = False,
    residual: Annotated[
        bool,
        typer.Option(
            help="With --bpp: a tile may add a residual layer where that removes more error per "
            "byte than more iterations (from ~0.25 bpp; rates up to lossless; slower encoding)."
        ),
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Encoder actors, each holding the model (default 2).")
    ] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="GPUs per encoder; fractions share a GPU (default 0).")
    ] = None,
    cpus_per_worker: Annotated[
        float | None, typer.Option(help="CPUs per encoder; fractions allowed (default 0.5).")
    ] = None,
    batch_images: Annotated[
        int | None, typer.Option(help="Images per encoder call, tiles coded together (default 4).")
    ] = None,
    tile_size: Annotated[
        int | None, typer.Option(help="Codec tile = zarr chunk side, multiple of 16 (default 512).")
    ] = None,
    refine_steps: Annotated[
        int | None,
        typer.Option(
            help="Search each code this many steps for a better one (8: up to ~1 dB at low "
            "rates, several times the encoding work; default 0)."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Settings file (YAML, TOML or JSON); flags and RADIARC_* env win."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Manifest partition name (default: time + random).")
    ] = None,
    report: Annotated[
        bool, typer.Option(help="Write the run report into ARCHIVE/reports/RUN/.")
    ] = True,
    endpoint_url: EndpointOption = None,
    storage_option: StorageOptionOption = None,
) -> None:
    """Migrate a DICOM export into a Radiarc archive: scan, skip what is done, encode on Ray
    actors, write and verify every image, record manifests, write a report.

    Safe to stop and start again: a re-run finishes what is missing and encodes nothing twice.
    Settings also come from RADIARC_* environment variables (RADIARC_RAY__WORKERS=4) and
    --config; RAY_ADDRESS joins a Ray cluster instead of starting a local one.
    """
    overrides = flag_overrides(
        iterations=iterations,
        bpp=bpp,
        min_ssim=min_ssim,
        min_psnr=min_psnr,
        max_error=max_error,
        adaptive=adaptive,
        half_res=half_res,
        residual=residual,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        batch_images=batch_images,
        tile_size=tile_size,
        refine_steps=refine_steps,
        run_id=run_id,
        options=storage_options(endpoint_url, storage_option),
        report=report,
    )
    summary = run_with_progress(source, archive, overrides, config)
    console.print(summary_table(summary))
    if summary.failed:
        raise typer.Exit(code=1)


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the sample export and the archive.")] = Path(
        "demo-out"
    ),
    data: Annotated[
        Path, typer.Option(help="Sample X-rays to build the export from (PNG and DICOM).")
    ] = Path("tests/data"),
    iterations: Annotated[int, typer.Option(help="Codec iterations per tile.")] = 4,
    workers: Annotated[int, typer.Option(help="Encoder actors on the local Ray.")] = 2,
    fresh: Annotated[
        bool, typer.Option(help="Delete OUT first (else a re-run shows that nothing is redone).")
    ] = False,
) -> None:
    """The whole job on the bundled samples: build a DICOM export of real X-rays, migrate it
    into a local archive (local Ray, ephemeral Prefect), print the summary, and read one image
    back with plain zarr in a fresh Python process."""
    from storage.manifest import read_manifest
    from storage.synth import sample_export

    started = time.perf_counter()
    if fresh and out.exists():
        shutil.rmtree(out)
    export, archive = out / "export", out / "archive"
    if not export.exists():
        written = sample_export(data, str(export))
        console.print(f"sample export: {len(written)} files in {export}")
    overrides = flag_overrides(iterations=iterations, workers=workers)
    summary = run_with_progress(str(export), str(archive), overrides, None)
    console.print(summary_table(summary))
    archived = read_manifest(
        str(archive),
        columns=["study_instance_uid", "series_instance_uid", "sop_instance_uid", "status"],
    ).to_pylist()
    done = [row for row in archived if row["status"] == "archived"]
    if not done:
        raise _fail("nothing was archived")
    first = done[0]
    path = archive / first["study_instance_uid"] / first["series_instance_uid"]
    path = path / first["sop_instance_uid"]
    result = subprocess.run(
        [sys.executable, "-c", READ_BACK, str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise _fail(f"reading back with plain zarr failed:\n{result.stderr[-2000:]}")
    console.print(result.stdout.strip())
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s; archive at {archive}")
