"""Archiving one DICOM instance: one zarr v3 array per instance (layout: storage.layout).

Each array's chunk is one codec tile (``tile_size``, 512 by default) coded by
:class:`codec.zarr_codec.RadiarcZarrCodec`, optionally grouped into shards of
``shard_tiles`` x ``shard_tiles`` chunks (fewer objects on S3; a region still decodes only its
chunks). Its attributes hold ``dicom``, the header without pixel data as DICOM JSON (PS3.18
F.2), and ``radiarc``: the source URI and checksums, the pixel facts (bits stored, allocated,
photometric), the codec configuration, the metrics measured on the stored bytes, and
``complete``, set last: an array without it is the remains of an interrupted write.

The header keeps the patient's identity because an export must give it back; the archive is
as protected as the PACS. Nothing here logs or returns a patient value (see storage.phi).

:func:`archive_instance` is the one step a migration repeats per image: encode into the
array, decode it back from the store, measure, and return the manifest row.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
import zarr
from fsspec import AbstractFileSystem

from codec import bitstream
from codec.chunk import CODEC_ID, installed_weights_hash, rate_config
from codec.io import GrayImage
from codec.metrics import bits_per_pixel, measure
from codec.rate import RateControl, check_floor
from codec.weights import DEFAULT_MODEL_ID
from codec.zarr_codec import RadiarcZarrCodec
from storage.chunks import (
    CHUNKS_DIGEST,
    ChunkIndex,
    chunk_arrays,
    encode_images_chunks,
    pixels_sha256,
    put_chunks,
    stored_chunks,
)
from storage.dicom import DicomError
from storage.fsutil import join
from storage.layout import LAYOUT_VERSION, Archive, header_text, instance_path
from storage.manifest import ManifestRow, codec_config_json, default_worker, validate_run_id
from storage.phi import patient_key, quiet_pydicom, redact
from storage.retry import with_retries
from storage.scan import ScanItem
from storage.source import SourceImage, SourceReadError, read_source
from storage.uids import UIDError

__all__ = [
    "LAYOUT_VERSION",
    "SECRET_ENV",
    "Archive",
    "ArchiveSettings",
    "RunContext",
    "archive_instance",
    "archive_item",
    "skipped_row",
    "unreadable_row",
]

#: Environment variable holding the operator's secret for :func:`storage.phi.patient_key`.
SECRET_ENV = "RADIARC_PATIENT_KEY_SECRET"
#: Tries of an instance's write + verify when the store fails transiently (storage.retry).
WRITE_ATTEMPTS = 3
WRITE_BACKOFF_SECONDS = 0.5
log = logging.getLogger(__name__)
_MAX_REASON = 300


@dataclass(frozen=True)
class ArchiveSettings:
    """How instances are coded and laid out; :meth:`codec_key` names it in manifests."""

    rate: RateControl = field(default_factory=lambda: RateControl(iterations=4))
    model_id: str = DEFAULT_MODEL_ID
    tile_size: int = 512
    shard_tiles: int | None = None
    lenient_uids: bool = False
    refine_steps: int = 0  # encoder effort (codec/refine.py); readers need nothing

    def __post_init__(self) -> None:
        if not 16 <= self.tile_size <= bitstream.MAX_SIDE:
            raise ValueError(f"tile_size must be in 16..{bitstream.MAX_SIDE}")
        if self.shard_tiles is not None and self.shard_tiles < 1:
            raise ValueError("shard_tiles must be at least 1")

    def serializer(self, bits_stored: int) -> RadiarcZarrCodec:
        rate = rate_config(self.rate)
        return RadiarcZarrCodec(
            model_id=self.model_id,
            bits_stored=bits_stored,
            refine_steps=self.refine_steps,
            **rate,
        )

    def codec_config(self) -> dict[str, Any]:
        """Everything that decides the stored bytes except the image: plain JSON."""
        config: dict[str, Any] = {
            "codec": CODEC_ID,
            "model_id": self.model_id,
            "weights_hash": installed_weights_hash(self.model_id),
            "tile_size": self.tile_size,
            "shard_tiles": self.shard_tiles,
        }
        config.update(rate_config(self.rate))
        if self.refine_steps:  # only when used: the codec keys of older archives stay the same
            config["refine_steps"] = self.refine_steps
        return config

    def codec_key(self) -> str:
        return hashlib.sha256(codec_config_json(self.codec_config()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunContext:
    """Who is archiving: the run (manifest partition), the worker, the patient-key secret."""

    run_id: str
    worker: str = field(default_factory=default_worker)
    patient_key_secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)

    @classmethod
    def from_env(cls, run_id: str, worker: str | None = None) -> RunContext:
        """A context whose patient-key secret comes from ``RADIARC_PATIENT_KEY_SECRET``
        (UTF-8); without it, manifests carry no patient key at all."""
        secret = os.environ.get(SECRET_ENV, "").encode() or None
        return cls(run_id, worker or default_worker(), secret)


def archive_item(
    archive: Archive,
    fs: AbstractFileSystem,
    item: ScanItem,
    settings: ArchiveSettings,
    context: RunContext,
) -> ManifestRow:
    """Read one scanned file and archive it; a skipped row if it cannot be archived."""
    start = time.perf_counter()
    try:
        source = read_source(fs, item)
    except SourceReadError as error:
        log.warning("failed to read a source: %s", error.reason)  # no path: it may hold PHI
        return unreadable_row(context, item.uri, error.reason, item.checksum, item.size)
    except DicomError as error:
        log.warning("skipped a source: %s", error.reason)
        return skipped_row(context, item.uri, error.reason, item.checksum, item.size)
    return archive_instance(
        archive, source, settings, context, read_seconds=time.perf_counter() - start
    )


def skipped_row(
    context: RunContext,
    source_uri: str,
    reason: str,
    checksum: str | None = None,
    source_bytes: int | None = None,
) -> ManifestRow:
    """The row of an input that cannot be archived (not DICOM, colour, undecodable, ...)."""
    return _source_row(context, "skipped", source_uri, reason, checksum, source_bytes)


def unreadable_row(
    context: RunContext,
    source_uri: str,
    reason: str,
    checksum: str | None = None,
    source_bytes: int | None = None,
) -> ManifestRow:
    """The row of a source that could not be fetched (after retries): ``failed``, so that the
    next run tries it again."""
    return _source_row(context, "failed", source_uri, reason, checksum, source_bytes)


def _source_row(
    context: RunContext,
    status: str,
    source_uri: str,
    reason: str,
    checksum: str | None,
    source_bytes: int | None,
) -> ManifestRow:
    return ManifestRow(
        run_id=context.run_id,
        status=status,
        timestamp=datetime.now(UTC),
        worker=context.worker,
        reason=reason[:_MAX_REASON],
        source_uri=source_uri,
        source_checksum=checksum,
        source_bytes=source_bytes,
    )


def archive_instance(
    archive: Archive,
    source: SourceImage,
    settings: ArchiveSettings,
    context: RunContext,
    *,
    read_seconds: float | None = None,
    encoded: Mapping[ChunkIndex, bytes] | None = None,
    encode_error: Exception | None = None,
    encode_seconds: float = 0.0,
) -> ManifestRow:
    """Archive one decoded instance; the manifest row says how it went.

    Steps: validate the UIDs (a bad one skips the image), write the array (attributes first,
    ``complete: false``), read it back from the store and decode it, measure against the
    source pixels, read the stored objects for the real byte count and iterations, then mark
    the array complete with its metrics. Errors after validation give a ``failed`` row; the
    array may then be partial, without ``complete``, and a later run overwrites it.

    ``encoded`` holds chunk streams already encoded elsewhere (by a batch encoder, as
    :func:`encode_instance_chunks` does), stored as they are; ``encode_seconds`` is the time
    that took. Without it the image is encoded here the same way. ``encode_error`` is that
    encoder's error for this image: the image is then recorded ``failed`` with it, and nothing
    is written. Under a quality floor (``min_ssim`` or ``min_psnr``) every tile of the decoded
    image is measured against it: an image with a tile below it gets a ``failed`` row saying
    so, and its array stays without ``complete``. Under a bpp target the image's chunks share
    its budget (:func:`codec.chunk.encode_chunks`)."""
    start = time.perf_counter()
    header = source.dicom.header
    image = source.dicom.image
    rows, columns = image.pixels.shape
    facts: dict[str, Any] = {
        "source_uri": redact(source.uri, header),
        "source_checksum": source.checksum,
        "source_bytes": source.n_bytes,
        "patient_key": patient_key(context.patient_key_secret, header_text(header, "PatientID")),
        "modality": header_text(header, "Modality") or None,
        "body_part": header_text(header, "BodyPartExamined") or None,
        "rows": rows,
        "columns": columns,
        "bits_stored": image.bits_stored,
        "photometric": source.dicom.photometric,
        "pixel_bytes": image.pixels.nbytes,
        "model_id": settings.model_id,
        "rate": settings.rate.describe(),
        "tile_size": settings.tile_size,
        "read_seconds": read_seconds,
    }
    try:
        study, series, sop = instance_path(header, settings.lenient_uids)
    except UIDError as error:
        reason = redact(str(error), header)
        log.warning("skipped %s: %s", facts["source_uri"], reason)
        return _row(context, "skipped", reason, facts, start)
    facts.update(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop)
    try:
        config = settings.codec_config()
        facts.update(
            weights_hash=config["weights_hash"],
            codec_key=settings.codec_key(),
            codec_config=codec_config_json(config),
        )
        if encode_error is not None:
            raise encode_error
        if encoded is None:
            began = time.perf_counter()
            encoded = encode_instance_chunks(image, settings)
            encode_seconds += time.perf_counter() - began
        # A write or read-back that fails in passing (throttling, a dropped connection) is
        # tried again from the start: the array is recreated, so no half of it survives.
        facts.update(
            with_retries(
                partial(
                    _write_and_verify,
                    archive,
                    source,
                    settings,
                    context,
                    f"{study}/{series}/{sop}",
                    encoded,
                ),
                WRITE_ATTEMPTS,
                WRITE_BACKOFF_SECONDS,
            )
        )
        facts["encode_seconds"] += encode_seconds
    except Exception as error:  # any failure of one image is recorded, not fatal to the run
        reason = redact(f"{type(error).__name__}: {error}", header)
        log.warning("failed %s: %s", sop, reason)
        return _row(context, "failed", reason, facts, start)
    shortfall = facts.pop("floor_shortfall")
    if shortfall is not None:
        log.warning("failed %s: %s", sop, shortfall)
        return _row(context, "failed", shortfall, facts, start)
    log.info(
        "archived %s: %.1f:1, %.3f bpp, PSNR %.2f dB, SSIM %.4f",
        sop,
        facts["ratio"],
        facts["bpp"],
        facts["psnr"],
        facts["ssim"],
    )
    return _row(context, "archived", None, facts, start)


def _write_and_verify(
    archive: Archive,
    source: SourceImage,
    settings: ArchiveSettings,
    context: RunContext,
    path: str,
    encoded: Mapping[ChunkIndex, bytes],
) -> dict[str, Any]:
    dicom = source.dicom
    image = dicom.image
    with quiet_pydicom():
        header_json = dicom.header.to_json_dict(bulk_data_threshold=2**62)
    attributes: dict[str, Any] = {
        "radiarc": {
            "layout_version": LAYOUT_VERSION,
            "complete": False,
            "source": {
                "uri": source.uri,
                "sha256": source.sha256,
                "etag": source.etag,
                "bytes": source.n_bytes,
                "transfer_syntax_uid": dicom.transfer_syntax_uid,
            },
            "pixels": {
                "rows": int(image.pixels.shape[0]),
                "columns": int(image.pixels.shape[1]),
                "bits_stored": image.bits_stored,
                "bits_allocated": int(
                    dicom.header.get("BitsAllocated") or 8 * image.pixels.itemsize
                ),
                "photometric": dicom.photometric,
                "high_bits_masked": dicom.high_bits_masked,
            },
            "codec": {**settings.codec_config(), "codec_key": settings.codec_key()},
            "archived": {"run_id": context.run_id, "worker": context.worker},
        },
        "dicom": header_json,
    }
    tile = settings.tile_size
    shards = None
    if settings.shard_tiles:
        shards = (tile * settings.shard_tiles, tile * settings.shard_tiles)
    began = time.perf_counter()
    root = zarr.open_group(archive.store, mode="a")
    array = root.create_array(
        name=path,
        shape=image.pixels.shape,
        chunks=(tile, tile),
        shards=shards,
        dtype=image.pixels.dtype,
        serializer=settings.serializer(image.bits_stored),
        compressors=None,
        fill_value=0,
        overwrite=True,
        attributes=attributes,
    )
    put_chunks(archive.fs, join(archive.root, path), array.metadata.to_dict(), encoded)
    written = time.perf_counter()

    decoded = np.asarray(archive.open_array(path)[...])
    quality = measure(image.pixels, decoded, image.bits_stored)
    floor = check_floor(image.pixels, decoded, image.bits_stored, tile, settings.rate)
    stored = stored_chunks(archive.fs, join(archive.root, path), array.metadata.to_dict())
    pixels = image.pixels.size
    archived_bytes = stored.n_bytes
    metrics = {
        "archived_bytes": archived_bytes,
        "ratio": image.pixels.nbytes / archived_bytes if archived_bytes else math.inf,
        "bpp": bits_per_pixel(archived_bytes, pixels),
        "psnr": quality.psnr,
        "ssim": quality.ssim,
        "ms_ssim": quality.ms_ssim,
        "max_abs_error": quality.max_abs_error,
        "iterations": float(np.mean(stored.tile_iterations)) if stored.tile_iterations else 0.0,
        "iterations_min": min(stored.tile_iterations, default=0),
        "iterations_max": max(stored.tile_iterations, default=0),
    }
    attributes["radiarc"]["quality"] = {key: _json_number(value) for key, value in metrics.items()}
    digests = {"stored_sha256": stored.sha256, "decoded_sha256": pixels_sha256(decoded)}
    attributes["radiarc"]["stored"] = {
        "algorithm": CHUNKS_DIGEST,
        "sha256": digests["stored_sha256"],
        "objects": stored.objects,
        "bytes": stored.n_bytes,
        "decoded_sha256": digests["decoded_sha256"],
    }
    shortfall = None
    if floor is not None and not floor.met:
        shortfall = f"below quality floor: {floor.describe()}"
        attributes["radiarc"]["quality"]["floor_shortfall"] = shortfall
    attributes["radiarc"]["complete"] = shortfall is None
    attributes["radiarc"]["archived"]["timestamp"] = datetime.now(UTC).isoformat()
    array.update_attributes(attributes)
    verified = time.perf_counter()
    metadata_bytes = len(archive.fs.cat_file(join(archive.root, path, "zarr.json")))
    return {
        **metrics,
        **digests,
        "metadata_bytes": metadata_bytes,
        "encode_seconds": written - began,
        "verify_seconds": verified - written,
        "floor_shortfall": shortfall,
    }


def encode_instance_chunks(image: GrayImage, settings: ArchiveSettings) -> dict[ChunkIndex, bytes]:
    """The chunk streams of one image as the migration's batch encoders write them: the
    chunks zarr would encode, through the network together, sharing one bpp budget."""
    config = settings.serializer(image.bits_stored).settings
    (streams,) = encode_images_chunks([(config, chunk_arrays(image.pixels, settings.tile_size))])
    return streams


def _json_number(value: Any) -> Any:
    """JSON has no infinity (a lossless tile's PSNR): store null there."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _row(
    context: RunContext, status: str, reason: str | None, facts: dict[str, Any], start: float
) -> ManifestRow:
    return ManifestRow(
        run_id=context.run_id,
        status=status,
        timestamp=datetime.now(UTC),
        worker=context.worker,
        reason=reason[:_MAX_REASON] if reason else None,
        total_seconds=time.perf_counter() - start + (facts.get("read_seconds") or 0.0),
        **facts,
    )
