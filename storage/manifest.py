"""Parquet quality manifests: one row per image per run, written atomically, read fast.

Layout inside an archive (docs/storage.md)::

    ARCHIVE/manifests/run_id=<run id>/part-<utc time>-<worker>-<seq>-<random>.parquet

Each part is written whole by :func:`storage.fsutil.write_atomic` (a local temporary file
renamed into place, or a single S3 PUT), so a reader never sees half a file and a crash leaves
at most a hidden ``.part-*.tmp`` file, which readers skip. Parts are never rewritten or
appended to; a run adds parts, a re-run adds rows. Partitioning by run keeps one run's rows
together and lets a query for a run read only its directory.

The schema is :data:`SCHEMA`, versioned by :data:`SCHEMA_VERSION`, stored in every row. Column
names are stable snake_case; new versions may add columns (older parts read as nulls there)
but never rename or retype one. No column holds a patient name, ID or birth date:
``patient_key`` is a keyed hash (:func:`storage.phi.patient_key`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from storage.fsutil import StorageOptions, join, open_fs, pyarrow_filesystem, write_atomic

__all__ = [
    "COLUMNS",
    "MANIFEST_DIR",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATUSES",
    "Done",
    "ManifestRow",
    "ManifestWriter",
    "default_worker",
    "done_instances",
    "manifest_dataset",
    "read_manifest",
    "skipped_sources",
    "validate_run_id",
]

SCHEMA_VERSION = 2
MANIFEST_DIR = "manifests"
STATUSES = ("archived", "skipped", "failed")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: name, Arrow type, meaning. The single source for the schema and for docs/storage.md.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("schema_version", pa.int16(), "manifest schema version of the row (currently 2)"),
    ("run_id", pa.string(), "the migration run that wrote the row (also the partition)"),
    ("timestamp", pa.timestamp("us", tz="UTC"), "when the row was produced (UTC)"),
    ("worker", pa.string(), "host and process that produced it"),
    ("status", pa.string(), "`archived`, `skipped` (input cannot be archived) or `failed`"),
    ("reason", pa.string(), "why it was skipped or failed; null when archived"),
    ("source_uri", pa.string(), "the source file (patient values redacted if the path held any)"),
    ("source_checksum", pa.string(), "`etag:<ETag>` from the store, or `sha256:<hex>`"),
    ("source_bytes", pa.int64(), "size of the source file in bytes"),
    ("study_instance_uid", pa.string(), "Study Instance UID (0020,000D)"),
    ("series_instance_uid", pa.string(), "Series Instance UID (0020,000E)"),
    ("sop_instance_uid", pa.string(), "SOP Instance UID (0008,0018) of the source"),
    (
        "patient_key",
        pa.string(),
        "HMAC-SHA256 of Patient ID under the operator's secret; null without a secret",
    ),
    ("modality", pa.string(), "Modality (0008,0060)"),
    ("body_part", pa.string(), "Body Part Examined (0018,0015)"),
    ("rows", pa.int32(), "image rows"),
    ("columns", pa.int32(), "image columns"),
    ("bits_stored", pa.int16(), "Bits Stored (0028,0101): 8..16"),
    ("photometric", pa.string(), "MONOCHROME1 or MONOCHROME2"),
    ("pixel_bytes", pa.int64(), "uncompressed pixel bytes: rows x columns x 1 or 2"),
    ("archived_bytes", pa.int64(), "bytes of the stored chunks (or shards) of the pixel array"),
    ("metadata_bytes", pa.int64(), "bytes of the array's zarr.json (header and attributes)"),
    ("ratio", pa.float64(), "pixel_bytes / archived_bytes (as in Lossy Image Compression Ratio)"),
    ("bpp", pa.float64(), "archived_bytes x 8 / pixels"),
    ("psnr", pa.float64(), "PSNR in dB, peak 2**bits_stored - 1 (inf when lossless)"),
    ("ssim", pa.float64(), "SSIM (Gaussian 11x11, sigma 1.5)"),
    ("ms_ssim", pa.float64(), "MS-SSIM, 5 scales; null for images under 161 pixels a side"),
    ("max_abs_error", pa.int32(), "largest absolute pixel difference"),
    ("iterations", pa.float64(), "codec iterations kept, mean over coded tiles"),
    ("iterations_min", pa.int16(), "fewest iterations kept by a tile"),
    ("iterations_max", pa.int16(), "most iterations kept by a tile"),
    ("model_id", pa.string(), "codec model id"),
    ("weights_hash", pa.string(), "first 8 bytes of the weights' SHA-256, hex"),
    ("rate", pa.string(), "rate setting, e.g. `iterations=4`, `bpp<=0.5`, `psnr>=45`"),
    ("tile_size", pa.int32(), "chunk side = codec tile side, pixels"),
    ("codec_key", pa.string(), "16 hex digits naming the whole codec configuration"),
    ("codec_config", pa.string(), "the codec configuration as JSON"),
    ("read_seconds", pa.float64(), "time to fetch and decode the source"),
    ("encode_seconds", pa.float64(), "time to encode and write the array"),
    ("verify_seconds", pa.float64(), "time to read back, decode and measure"),
    ("total_seconds", pa.float64(), "wall time for the image"),
    # Version 2: integrity digests (null in older rows).
    (
        "stored_sha256",
        pa.string(),
        "SHA-256 of the stored chunk objects as archived (`radiarc.stored`); null before v2",
    ),
    (
        "decoded_sha256",
        pa.string(),
        "SHA-256 of the pixels decoded and measured at archive time; null before v2",
    ),
]
SCHEMA = pa.schema([pa.field(name, kind) for name, kind, _ in COLUMNS])


@dataclass
class ManifestRow:
    """One manifest row; field names and order are :data:`COLUMNS`'."""

    run_id: str
    status: str
    timestamp: datetime
    worker: str
    schema_version: int = SCHEMA_VERSION
    reason: str | None = None
    source_uri: str | None = None
    source_checksum: str | None = None
    source_bytes: int | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    patient_key: str | None = None
    modality: str | None = None
    body_part: str | None = None
    rows: int | None = None
    columns: int | None = None
    bits_stored: int | None = None
    photometric: str | None = None
    pixel_bytes: int | None = None
    archived_bytes: int | None = None
    metadata_bytes: int | None = None
    ratio: float | None = None
    bpp: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    ms_ssim: float | None = None
    max_abs_error: int | None = None
    iterations: float | None = None
    iterations_min: int | None = None
    iterations_max: int | None = None
    model_id: str | None = None
    weights_hash: str | None = None
    rate: str | None = None
    tile_size: int | None = None
    codec_key: str | None = None
    codec_config: str | None = None
    read_seconds: float | None = None
    encode_seconds: float | None = None
    verify_seconds: float | None = None
    total_seconds: float | None = None
    stored_sha256: str | None = None
    decoded_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        validate_run_id(self.run_id)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def validate_run_id(run_id: str) -> str:
    """Run ids become directory names: letters, digits, '.', '_', '-', not starting with a
    dot, at most 128 characters."""
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return run_id


def default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def rows_to_table(rows: list[ManifestRow]) -> pa.Table:
    names = [field.name for field in fields(ManifestRow)]
    assert sorted(names) == sorted(SCHEMA.names), "ManifestRow and COLUMNS disagree"
    return pa.Table.from_pylist([row.record() for row in rows], schema=SCHEMA)


class ManifestWriter:
    """Collects rows and writes them as Parquet parts of one run, ``batch_rows`` at a time.

    Use as a context manager (the last partial batch is written on exit, also after an
    exception, so work already done is recorded) or call :meth:`flush` yourself.
    """

    def __init__(
        self,
        archive_uri: str,
        run_id: str,
        *,
        storage_options: StorageOptions | None = None,
        worker: str | None = None,
        batch_rows: int = 500,
        fs: AbstractFileSystem | None = None,
    ) -> None:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        if fs is None:
            fs, root = open_fs(archive_uri, storage_options)
        else:
            root = archive_uri
        self.fs = fs
        self.run_id = validate_run_id(run_id)
        self.directory = join(root, MANIFEST_DIR, f"run_id={run_id}")
        self.worker = worker or default_worker()
        self.batch_rows = batch_rows
        self.parts: list[str] = []
        self._rows: list[ManifestRow] = []

    def add(self, row: ManifestRow) -> None:
        if row.run_id != self.run_id:
            raise ValueError(f"row of run {row.run_id!r} given to the writer of {self.run_id!r}")
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> str | None:
        """Write the pending rows as one part; its path, or None when there were none."""
        if not self._rows:
            return None
        table = rows_to_table(self._rows)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        worker = re.sub(r"[^A-Za-z0-9_-]", "-", self.worker)[:40]
        name = f"part-{stamp}-{worker}-{len(self.parts):05d}-{uuid.uuid4().hex[:8]}.parquet"
        path = join(self.directory, name)
        write_atomic(self.fs, path, sink.getvalue().to_pybytes())
        self.parts.append(path)
        self._rows = []
        return path

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.flush()


def manifest_dataset(
    archive_uri: str,
    storage_options: StorageOptions | None = None,
    *,
    run_id: str | None = None,
    fs: AbstractFileSystem | None = None,
) -> ds.Dataset:
    """The archive's manifests as one pyarrow dataset with :data:`SCHEMA` (empty if none).

    Only ``*.parquet`` files count; hidden and ``_``-prefixed names (temporaries) are skipped.
    ``run_id`` limits it to one run's directory.
    """
    if fs is None:
        fs, root = open_fs(archive_uri, storage_options)
    else:
        root = archive_uri
    directory = join(root, MANIFEST_DIR)
    if run_id is not None:
        directory = join(directory, f"run_id={validate_run_id(run_id)}")
    files = _parquet_files(fs, directory)
    if not files:
        return ds.dataset(pa.Table.from_pylist([], schema=SCHEMA))
    return ds.dataset(files, filesystem=pyarrow_filesystem(fs), format="parquet", schema=SCHEMA)


def _parquet_files(fs: AbstractFileSystem, directory: str) -> list[str]:
    """Finished parts under ``directory``: ``*.parquet``, not hidden (temporaries are)."""
    try:
        found = fs.find(directory)
    except FileNotFoundError:
        return []
    return sorted(
        path
        for path in found
        if path.endswith(".parquet") and not path.rsplit("/", 1)[-1].startswith((".", "_"))
    )


def read_manifest(
    archive_uri: str,
    storage_options: StorageOptions | None = None,
    *,
    run_id: str | None = None,
    columns: list[str] | None = None,
    filter: pc.Expression | None = None,
) -> pa.Table:
    """Manifest rows as one table (all columns unless ``columns``)."""
    dataset = manifest_dataset(archive_uri, storage_options, run_id=run_id)
    return dataset.to_table(columns=columns, filter=filter)


@dataclass(frozen=True)
class Done:
    """What a resumed migration can skip: instances, and source files by checksum."""

    sop_instance_uids: frozenset[str]
    source_checksums: frozenset[str]

    def __contains__(self, value: object) -> bool:
        return value in self.sop_instance_uids or value in self.source_checksums


def done_instances(
    archive_uri: str, codec_key: str, storage_options: StorageOptions | None = None
) -> Done:
    """Instances whose latest archiving attempt succeeded with the configuration ``codec_key``.

    Reads four columns of the ``archived`` and ``failed`` rows only. The latest row per
    instance decides, whatever its configuration: an instance archived with this
    configuration and later re-archived with another (which overwrote its array) is not done.
    """
    wanted = ["sop_instance_uid", "source_checksum", "status", "codec_key", "timestamp"]
    table = read_manifest(
        archive_uri,
        storage_options,
        columns=wanted,
        filter=pc.field("status").isin(["archived", "failed"])
        & pc.field("sop_instance_uid").is_valid(),
    )
    if table.num_rows == 0:
        return Done(frozenset(), frozenset())
    table = table.sort_by([("timestamp", "ascending")])
    latest = table.group_by("sop_instance_uid", use_threads=False).aggregate(
        [("status", "last"), ("codec_key", "last"), ("source_checksum", "last")]
    )
    done = latest.filter(
        pc.and_(
            pc.equal(latest["status_last"], "archived"),
            pc.equal(latest["codec_key_last"], codec_key),
        )
    )
    checksums = [value for value in done["source_checksum_last"].to_pylist() if value]
    return Done(frozenset(done["sop_instance_uid"].to_pylist()), frozenset(checksums))


def skipped_sources(
    archive_uri: str,
    storage_options: StorageOptions | None = None,
    *,
    retry_reasons: tuple[str, ...] = ("cannot read",),
) -> frozenset[str]:
    """Checksums of source files whose latest row says they cannot be archived (``skipped``:
    not decodable, colour, invalid UIDs, ...), so that a re-run need not read them again nor
    record them twice. Reasons starting with one of ``retry_reasons`` (a read that failed,
    perhaps for a moment) are left out: those files are worth another try."""
    wanted = ["source_checksum", "status", "reason", "timestamp"]
    table = read_manifest(
        archive_uri,
        storage_options,
        columns=wanted,
        filter=pc.field("source_checksum").is_valid(),
    )
    if table.num_rows == 0:
        return frozenset()
    table = table.sort_by([("timestamp", "ascending")])
    latest = table.group_by("source_checksum", use_threads=False).aggregate(
        [("status", "last"), ("reason", "last")]
    )
    settled = []
    for checksum, status, reason in zip(
        latest["source_checksum"].to_pylist(),
        latest["status_last"].to_pylist(),
        latest["reason_last"].to_pylist(),
        strict=True,
    ):
        if status == "skipped" and not str(reason or "").startswith(retry_reasons):
            settled.append(checksum)
    return frozenset(settled)


def codec_config_json(config: dict[str, Any]) -> str:
    """Canonical JSON of a codec configuration (sorted keys, no spaces)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))
