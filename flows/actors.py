"""The encoder that Ray runs as actors: one model per actor, many images and tiles per call.

:class:`Encoder` is a plain class (tests use it directly); the migration flow wraps it with
``ray.remote`` and chooses CPUs, GPUs and restarts where the pool is made. Each
:meth:`Encoder.process` call takes a batch of scanned files and, for all of them together:
reads them (with retries on transient I/O errors), cuts every image into its zarr chunks
(:func:`storage.chunks.chunk_arrays`), encodes all those tiles in batched network calls
(:func:`storage.chunks.encode_images_chunks`), then stores, verifies and measures each image
(:func:`storage.archive.archive_instance`) and returns the manifest rows.

This module never imports Prefect: actors run in Ray worker processes, and a Prefect import
there would start an API server per worker. Prefect stays in the driver (flows/migrate.py).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from codec.chunk import ChunkSettings
from codec.weights import load_model, model_device
from flows.failpoints import FailPoints
from storage.archive import (
    Archive,
    ArchiveSettings,
    RunContext,
    archive_instance,
    skipped_row,
    unreadable_row,
)
from storage.chunks import ChunkIndex, chunk_arrays, encode_images_chunks
from storage.dicom import DicomError
from storage.fsutil import StorageOptions, open_fs
from storage.layout import instance_path
from storage.manifest import ManifestRow, default_worker
from storage.retry import is_transient, with_retries
from storage.scan import ScanItem
from storage.source import SourceImage, SourceReadError, read_source
from storage.uids import UIDError

__all__ = ["STAGES", "BatchResult", "Encoder", "EncoderJob", "is_transient", "with_retries"]

log = logging.getLogger(__name__)
STAGES = ("read", "encode", "write", "verify")
Streams = dict[ChunkIndex, bytes]


@dataclass(frozen=True)
class EncoderJob:
    """What every encoder of a run needs to know (sent once, when the actor starts)."""

    source_uri: str
    archive_uri: str
    archive_settings: ArchiveSettings
    context: RunContext
    source_options: StorageOptions = field(default_factory=dict, repr=False)  # credentials
    archive_options: StorageOptions = field(default_factory=dict, repr=False)
    device: str = "auto"
    torch_threads: int = 1
    tile_batch: int = 8
    read_attempts: int = 3
    backoff_seconds: float = 0.5
    failpoints: FailPoints = field(default_factory=FailPoints)


@dataclass
class BatchResult:
    """The rows of one batch, where its time went, and the worker's peak memory."""

    rows: list[ManifestRow]
    seconds: dict[str, float]
    tiles: int
    peak_rss_mb: float
    worker: str


class Encoder:
    """Holds the model on its device; archives batches of scanned files."""

    def __init__(self, job: EncoderJob) -> None:
        if job.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first touched
        elif job.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked, but this worker sees no CUDA GPU")
        torch.set_num_threads(job.torch_threads)
        self.job = job
        self.context = replace(job.context, worker=default_worker())
        self.device = str(model_device(load_model(job.archive_settings.model_id)))
        self.archive = Archive(job.archive_uri, job.archive_options, create=False)
        self.source_fs, _ = open_fs(job.source_uri, job.source_options)

    def ready(self) -> str:
        """Where this encoder runs (the driver waits on it before sending work)."""
        return f"{self.context.worker} on {self.device}"

    def process(self, items: list[ScanItem]) -> BatchResult:
        seconds = dict.fromkeys(STAGES, 0.0)
        rows: list[ManifestRow] = []
        sources: list[tuple[SourceImage, float]] = []
        for item in items:
            started = time.perf_counter()
            try:
                source = with_retries(
                    partial(read_source, self.source_fs, item),
                    self.job.read_attempts,
                    self.job.backoff_seconds,
                )
            except SourceReadError as error:
                reason = f"{error.reason}, {self.job.read_attempts} attempts"
                log.warning("failed to read a file: %s", reason)  # no URI: it may hold PHI
                rows.append(
                    unreadable_row(self.context, item.uri, reason, item.checksum, item.size)
                )
                continue
            except DicomError as error:
                log.warning("skipped a file: %s", error.reason)
                rows.append(
                    skipped_row(self.context, item.uri, error.reason, item.checksum, item.size)
                )
                continue
            finally:
                elapsed = time.perf_counter() - started
                seconds["read"] += elapsed
            sources.append((source, elapsed))
        tiles, encoded, encode_share = self._encode(sources, seconds)
        for (source, read_seconds), chunks, share in zip(
            sources, encoded, encode_share, strict=True
        ):
            row = archive_instance(
                self.archive,
                source,
                self.job.archive_settings,
                self.context,
                read_seconds=read_seconds,
                encoded=None if isinstance(chunks, Exception) else chunks,
                encode_error=chunks if isinstance(chunks, Exception) else None,
                encode_seconds=share,
            )
            seconds["write"] += max(0.0, (row.encode_seconds or share) - share)
            seconds["verify"] += row.verify_seconds or 0.0
            rows.append(row)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return BatchResult(rows, seconds, tiles, peak, self.context.worker)

    def _encode(
        self, sources: list[tuple[SourceImage, float]], seconds: dict[str, float]
    ) -> tuple[int, list[Streams | Exception | None], list[float]]:
        """Every chunk of every valid image in batched network calls; per image its streams
        (``None`` for an image with invalid UIDs, which archive_instance skips before any
        coding) and its share of the time. If the batched call fails, each image is encoded
        alone, so that an image that breaks the encoder fails alone: its entry is then the
        exception, which becomes that image's ``failed`` row."""
        started = time.perf_counter()
        images = [self._image_chunks(source) for source, _ in sources]
        encoded: list[Streams | Exception | None]
        try:
            encoded = list(self._encode_images(images))
        except Exception as error:
            log.warning("batched encoding failed (%s); coding images alone", type(error).__name__)
            encoded = []
            for image in images:
                try:
                    encoded.extend(self._encode_images([image]))
                except Exception as alone:
                    encoded.append(alone)
        elapsed = time.perf_counter() - started
        seconds["encode"] += elapsed
        counts = [len(image.chunks) if image else 0 for image in images]
        total = sum(counts) or 1
        return sum(counts), encoded, [elapsed * count / total for count in counts]

    def _image_chunks(self, source: SourceImage) -> _ImageChunks | None:
        """The image's zarr chunks and codec settings; None when its UIDs are invalid."""
        settings = self.job.archive_settings
        try:
            instance_path(source.dicom.header, settings.lenient_uids)
        except UIDError:
            return None
        image = source.dicom.image
        return _ImageChunks(
            source.checksum,
            settings.serializer(image.bits_stored).settings,
            chunk_arrays(image.pixels, settings.tile_size),
        )

    def _encode_images(self, images: list[_ImageChunks | None]) -> list[Streams | None]:
        """All chunks of ``images`` through the network together, one stream map per image."""
        for image in images:
            if image is not None:
                self.job.failpoints.check("encode", image.checksum)
        present = [(image.config, image.chunks) for image in images if image is not None]
        streams = iter(encode_images_chunks(present, self.job.tile_batch))
        return [None if image is None else next(streams) for image in images]


@dataclass(frozen=True)
class _ImageChunks:
    checksum: str
    config: ChunkSettings
    chunks: list[tuple[ChunkIndex, np.ndarray]]


def actor_options(ray_settings: Any) -> dict[str, Any]:
    """``ray.remote`` options of an encoder from :class:`flows.settings.RaySettings`."""
    return {
        "num_cpus": ray_settings.cpus_per_worker,
        "num_gpus": ray_settings.gpus_per_worker,
        "max_restarts": ray_settings.max_restarts,
        "max_task_retries": ray_settings.max_restarts,
    }
