"""Audit queries over an archive's manifests: DuckDB in-process on a pyarrow dataset.

:func:`connect` registers the manifests (local or S3, read through fsspec) as a view named
``manifest`` in an in-memory DuckDB, then turns off DuckDB's own file and network access and
locks its configuration: a query, even a user's ``--sql``, can read the manifest and nothing
else, and DuckDB never tries to download the httpfs extension. Results are pyarrow tables;
:func:`render` prints them as an aligned table, CSV or JSON.

The summary holds totals per run and overall (images, bytes in and out, ratios, bpp), quality
percentiles of archived images, and skipped/failed images grouped by reason. None of it can
hold a patient value: the manifest has none.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

from storage.fsutil import StorageOptions
from storage.manifest import manifest_dataset

__all__ = ["FORMATS", "below", "connect", "query", "render", "summary"]

FORMATS = ("table", "csv", "json")
QUALITY_COLUMNS = ("psnr", "ssim", "ms_ssim", "bpp", "ratio")
BELOW_COLUMNS = (
    "run_id, sop_instance_uid, study_instance_uid, series_instance_uid, modality, body_part, "
    "psnr, ssim, ms_ssim, ratio, bpp, iterations, source_uri"
)

_TOTALS = """
SELECT
    CASE WHEN grouping(run_id) = 1 THEN '(all runs)' ELSE run_id END AS run_id,
    count(*) AS rows,
    count(*) FILTER (WHERE status = 'archived') AS archived,
    count(*) FILTER (WHERE status = 'skipped') AS skipped,
    count(*) FILTER (WHERE status = 'failed') AS failed,
    count(DISTINCT sop_instance_uid) FILTER (WHERE status = 'archived') AS instances,
    (sum(source_bytes) FILTER (WHERE status = 'archived'))::BIGINT AS source_bytes,
    (sum(pixel_bytes) FILTER (WHERE status = 'archived'))::BIGINT AS pixel_bytes,
    (sum(archived_bytes + metadata_bytes) FILTER (WHERE status = 'archived'))::BIGINT
        AS stored_bytes,
    sum(pixel_bytes) FILTER (WHERE status = 'archived')
        / nullif(sum(archived_bytes) FILTER (WHERE status = 'archived'), 0) AS ratio,
    sum(source_bytes) FILTER (WHERE status = 'archived')
        / nullif(sum(archived_bytes + metadata_bytes) FILTER (WHERE status = 'archived'), 0)
        AS source_ratio,
    8.0 * sum(archived_bytes) FILTER (WHERE status = 'archived')
        / nullif(sum(rows::BIGINT * columns) FILTER (WHERE status = 'archived'), 0) AS bpp
FROM manifest
GROUP BY ROLLUP (run_id)
ORDER BY grouping(run_id), run_id
"""

_QUALITY = """
SELECT
    '{column}' AS metric,
    count({column}) AS images,
    min({column}) AS min,
    quantile_cont({column}, 0.05) AS p05,
    quantile_cont({column}, 0.50) AS p50,
    quantile_cont({column}, 0.95) AS p95,
    max({column}) AS max,
    avg({column}) AS mean
FROM manifest WHERE status = 'archived'
"""

_FAILURES = """
SELECT status, coalesce(reason, '') AS reason, count(*) AS images
FROM manifest WHERE status <> 'archived'
GROUP BY status, reason
ORDER BY images DESC, status, reason
"""


def connect(
    archive_uri: str, storage_options: StorageOptions | None = None, *, run_id: str | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the view ``manifest`` and no other data access."""
    dataset = manifest_dataset(archive_uri, storage_options, run_id=run_id)
    connection = duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    connection.register("manifest_dataset", dataset)
    connection.execute("CREATE VIEW manifest AS SELECT * FROM manifest_dataset")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def query(connection: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run ``sql`` (it sees the ``manifest`` view) and return the result."""
    return _arrow(connection.execute(sql))


def _arrow(result: duckdb.DuckDBPyConnection) -> pa.Table:
    """The result as a pyarrow table (``to_arrow_table`` from DuckDB 1.4 on)."""
    convert = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return convert()


def summary(connection: duckdb.DuckDBPyConnection) -> dict[str, pa.Table]:
    """Sections ``totals``, ``quality`` and ``failures`` (see the module docstring)."""
    quality = " UNION ALL ".join(_QUALITY.format(column=column) for column in QUALITY_COLUMNS)
    return {
        "totals": query(connection, _TOTALS),
        "quality": query(connection, quality),
        "failures": query(connection, _FAILURES),
    }


def below(
    connection: duckdb.DuckDBPyConnection,
    *,
    ssim: float | None = None,
    psnr: float | None = None,
) -> pa.Table:
    """Archived images whose SSIM is below ``ssim`` or whose PSNR is below ``psnr``, worst
    SSIM first."""
    if ssim is None and psnr is None:
        raise ValueError("give a quality floor: ssim, psnr or both")
    conditions, parameters = [], []
    if ssim is not None:
        conditions.append("ssim < ?")
        parameters.append(float(ssim))
    if psnr is not None:
        conditions.append("psnr < ?")
        parameters.append(float(psnr))
    sql = (
        f"SELECT {BELOW_COLUMNS} FROM manifest WHERE status = 'archived' AND "
        f"({' OR '.join(conditions)}) ORDER BY ssim, psnr, sop_instance_uid"
    )
    return _arrow(connection.execute(sql, parameters))


def render(sections: dict[str, pa.Table], fmt: str = "table") -> str:
    """Text of one or more result tables.

    ``table``: each section titled and aligned. ``csv``: one section is plain CSV; several
    are each preceded by a ``# name`` line and separated by a blank line. ``json``: one
    section is a list of row objects; several are an object of such lists. Infinite and NaN
    numbers (a lossless image's PSNR) are written as null in JSON.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "json":
        records = {
            name: [_json_row(row) for row in table.to_pylist()] for name, table in sections.items()
        }
        value: Any = next(iter(records.values())) if len(records) == 1 else records
        return json.dumps(value, indent=2, ensure_ascii=False)
    parts = []
    for name, table in sections.items():
        if fmt == "csv":
            text = _csv(table)
            parts.append(text if len(sections) == 1 else f"# {name}\n{text}")
        else:
            parts.append(f"{name}\n{_aligned(table)}")
    return "\n".join(parts).rstrip("\n") + "\n"


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {key: _json_value(value) for key, value in row.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        value = int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        value = int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _csv_text(value: Any) -> str:
    """Full precision for machines (``repr`` of a float round-trips)."""
    if isinstance(value, float):
        return repr(value)
    return _text(value)


def _csv(table: pa.Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow([_csv_text(row[name]) for name in table.column_names])
    return buffer.getvalue()


def _aligned(table: pa.Table) -> str:
    names = table.column_names
    rows = [[_text(row[name]) for name in names] for row in table.to_pylist()]
    if not rows:
        return "  (none)\n"
    widths = [max(len(name), *(len(row[i]) for row in rows)) for i, name in enumerate(names)]
    numeric = [
        pa.types.is_integer(field.type)
        or pa.types.is_floating(field.type)
        or pa.types.is_decimal(field.type)
        for field in table.schema
    ]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if is_number else cell.ljust(width)
            for cell, width, is_number in zip(cells, widths, numeric, strict=True)
        ]
        return "  " + "  ".join(padded).rstrip()

    rule = "  " + "  ".join("-" * width for width in widths)
    return "\n".join([line(names), rule, *(line(row) for row in rows)]) + "\n"
