"""``radiarc export``, ``radiarc audit`` and ``radiarc verify``: thin wrappers over storage/.

Archives may be local paths or any fsspec URI (``s3://bucket/archive``). Options for the
filesystem come from ``--endpoint-url`` (an S3 server other than AWS) and
``--storage-option KEY=VALUE`` (repeatable; VALUE is parsed as JSON when it can be, so
``anon=true`` gives a boolean); credentials come from the usual environment or config files.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydicom.multival import MultiValue

from storage.fsutil import StorageOptions

EndpointOption = Annotated[
    str | None,
    typer.Option(help="S3 endpoint URL, for S3 servers other than AWS (MinIO, Ceph, moto)."),
]
StorageOptionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-o",
        help="Filesystem option KEY=VALUE passed to fsspec (repeatable); VALUE may be JSON.",
    ),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def storage_options(endpoint_url: str | None, options: list[str] | None) -> StorageOptions:
    """fsspec options from the command line."""
    parsed: dict[str, Any] = {}
    for option in options or []:
        key, separator, value = option.partition("=")
        if not separator or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {option!r}")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    if endpoint_url:
        parsed["endpoint_url"] = endpoint_url
    return parsed


def export(
    archive: Annotated[str, typer.Argument(help="Archive path or URI (s3://bucket/archive).")],
    uid: Annotated[
        str,
        typer.Argument(help="SOP Instance UID of the original image, or STUDY/SERIES/SOP."),
    ],
    out: Annotated[str, typer.Argument(help="DICOM file to write (path or URI).")],
    uid_prefix: Annotated[
        str | None,
        typer.Option(
            help="Your organisation's UID root, ending in '.', for the new SOP Instance UID "
            "(default: a 2.25. UUID-derived UID)."
        ),
    ] = None,
    endpoint_url: EndpointOption = None,
    storage_option: StorageOptionOption = None,
) -> None:
    """Export an archived image as a DICOM file: the original header, the decoded pixels,
    Lossy Image Compression 01 with ratio and method, and a new, derived SOP Instance UID."""
    from storage.export import ExportError, export_dicom

    options = storage_options(endpoint_url, storage_option)
    try:
        dataset = export_dicom(
            archive,
            uid,
            out,
            storage_options=options,
            out_storage_options=options if "://" in out and not out.startswith("file:") else None,
            uid_prefix=uid_prefix,
        )
    except (ExportError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from error
    ratios = dataset.get("LossyImageCompressionRatio")
    ratio = ratios[-1] if isinstance(ratios, MultiValue) else ratios
    typer.echo(f"wrote {out}: SOP Instance UID {dataset.SOPInstanceUID} (ratio {ratio}:1)")


def audit(
    archive: Annotated[str, typer.Argument(help="Archive path or URI (s3://bucket/archive).")],
    below_ssim: Annotated[
        float | None, typer.Option(help="List archived images with SSIM below this.")
    ] = None,
    below_psnr: Annotated[
        float | None, typer.Option(help="List archived images with PSNR (dB) below this.")
    ] = None,
    sql: Annotated[
        str | None,
        typer.Option(help="Run this SQL (DuckDB) over the view `manifest` and print the result."),
    ] = None,
    run: Annotated[str | None, typer.Option(help="Only this run's rows.")] = None,
    format: Annotated[
        str, typer.Option("--format", "-f", help="Output: table, csv or json.")
    ] = "table",
    endpoint_url: EndpointOption = None,
    storage_option: StorageOptionOption = None,
) -> None:
    """Summarise an archive's manifests (images, bytes in/out, ratio, quality percentiles,
    failures by reason), list images below a quality floor, or run SQL over them."""
    import duckdb

    from storage.audit import FORMATS, below, connect, query, render, summary

    if format not in FORMATS:
        raise typer.BadParameter(f"choose one of {', '.join(FORMATS)}", param_hint="--format")
    options = storage_options(endpoint_url, storage_option)
    try:
        connection = connect(archive, options, run_id=run)
        if sql is not None:
            sections = {"result": query(connection, sql)}
        elif below_ssim is not None or below_psnr is not None:
            sections = {"below": below(connection, ssim=below_ssim, psnr=below_psnr)}
        else:
            sections = summary(connection)
    except (duckdb.Error, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from error
    typer.echo(render(sections, format), nl=False)


def verify(
    archive: Annotated[str, typer.Argument(help="Archive path or URI (s3://bucket/archive).")],
    sample: Annotated[
        int | None,
        typer.Option(help="Check this many randomly chosen archived instances (default 20)."),
    ] = None,
    all_instances: Annotated[
        bool,
        typer.Option("--all", help="Check every archived instance, and look for orphan arrays."),
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the random sample (default: a new one, printed)."),
    ] = None,
    run: Annotated[
        str | None, typer.Option(help="Only instances whose latest archived row is this run's.")
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="Output: table or json.")] = "table",
    endpoint_url: EndpointOption = None,
    storage_option: StorageOptionOption = None,
) -> None:
    """Check archived images against the manifests: each array exists and is complete, its
    stored bytes match the SHA-256 recorded at archive time, every chunk decodes (per-tile
    CRCs), shape and bytes match the manifest. Exit status 1 when anything is missing or
    corrupt."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from storage.audit import render
    from storage.verify import DEFAULT_SAMPLE, verify_archive

    if format not in ("table", "json"):
        raise _fail("--format must be table or json")
    if all_instances and sample is not None:
        raise _fail("give --sample N or --all, not both")
    if sample is not None and sample < 1:
        raise _fail("--sample must be at least 1")
    options = storage_options(endpoint_url, storage_option)
    console = Console(stderr=True)
    bar = Progress(
        "verifying",
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task("verify", total=None)
    try:
        with bar:
            report = verify_archive(
                archive,
                options,
                sample=None if all_instances else (sample or DEFAULT_SAMPLE),
                seed=seed,
                run_id=run,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from error
    if format == "json":
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        if report.problems:
            typer.echo(render({"problems": report.problems_table()}, "table"), nl=False)
        typer.echo(report.summary())
        if report.sampled:
            typer.echo(f"(--seed {report.seed} checks the same sample again)")
    raise typer.Exit(code=report.exit_code)
