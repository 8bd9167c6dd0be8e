"""The encoder that Ray runs as actors: one model per actor, many images and tiles per call.

:class:`Encoder` is a plain class (tests use it directly); the migration flow wraps it with
``ray.remote`` and chooses CPUs, GPUs and restarts where the pool is made. Each
:meth:`Encoder.process` call takes a batch of scanned files and, for all of them together:
reads them (with retries on transient I/O errors), cuts every image into its zarr chunks
(:func:`storage.chunks.chunk_arrays`), encodes all those tiles in batched network calls
(:func:`codec.chunk.encode_chunks`), then stores, verifies and measures each image
(:func:`storage.archive.archive_instance`) and returns the manifest rows.

This module never imports Prefect: actors run in Ray worker processes, and a Prefect import
there would start an API server per worker. Prefect stays in the driver (flows/migrate.py).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import torch

from codec.chunk import encode_chunks
from codec.weights import load_model, model_device
from storage.archive import Archive, ArchiveSettings, RunContext, archive_instance, skipped_row
from storage.chunks import chunk_arrays
from storage.dicom import DicomError
from storage.fsutil import StorageOptions, open_fs
from storage.layout import instance_path
from storage.manifest import ManifestRow, default_worker
from storage.scan import ScanItem
from storage.source import SourceImage, read_source
from storage.uids import UIDError

__all__ = ["STAGES", "BatchResult", "Encoder", "EncoderJob", "is_transient"]

log = logging.getLogger(__name__)
STAGES = ("read", "encode", "write", "verify")
T = TypeVar("T")


@dataclass(frozen=True)
class EncoderJob:
    """What every encoder of a run needs to know (sent once, when the actor starts)."""

    source_uri: str
    archive_uri: str
    archive_settings: ArchiveSettings
    context: RunContext
    source_options: StorageOptions = field(default_factory=dict)
    archive_options: StorageOptions = field(default_factory=dict)
    device: str = "auto"
    torch_threads: int = 1
    tile_batch: int = 8
    read_attempts: int = 3
    backoff_seconds: float = 0.5


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
            except DicomError as error:
                log.warning("skipped a file: %s", error.reason)  # no URI: it may hold PHI
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
                encoded=chunks,
                encode_seconds=share,
            )
            seconds["write"] += max(0.0, (row.encode_seconds or share) - share)
            seconds["verify"] += row.verify_seconds or 0.0
            rows.append(row)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return BatchResult(rows, seconds, tiles, peak, self.context.worker)

    def _encode(
        self, sources: list[tuple[SourceImage, float]], seconds: dict[str, float]
    ) -> tuple[int, list[dict[tuple[int, int], bytes] | None], list[float]]:
        """Every chunk of every valid image in batched network calls; per image its streams
        and its share of the time. Images with invalid UIDs get ``None`` (archive_instance
        skips them before any coding), and so do all images if batched encoding fails: zarr
        then codes each image alone, so that one bad image fails alone."""
        settings = self.job.archive_settings
        encoded: list[dict[tuple[int, int], bytes] | None] = [None] * len(sources)
        arrays, configs, owners = [], [], []
        for position, (source, _) in enumerate(sources):
            try:
                instance_path(source.dicom.header, settings.lenient_uids)
            except UIDError:
                continue
            encoded[position] = {}
            image = source.dicom.image
            config = settings.serializer(image.bits_stored).settings
            for index, chunk in chunk_arrays(image.pixels, settings.tile_size):
                arrays.append(chunk)
                configs.append(config)
                owners.append((position, index))
        started = time.perf_counter()
        try:
            streams = encode_chunks(arrays, configs, self.job.tile_batch)
        except Exception as error:  # each image's failure is recorded by the zarr path
            log.warning("batched encoding failed (%s); coding images alone", type(error).__name__)
            return len(arrays), [None] * len(sources), [0.0] * len(sources)
        finally:
            elapsed = time.perf_counter() - started
            seconds["encode"] += elapsed
        counts = [0] * len(sources)
        for (position, index), stream in zip(owners, streams, strict=True):
            chunks = encoded[position]
            assert chunks is not None
            chunks[index] = stream.data
            counts[position] += 1
        total = sum(counts) or 1
        return len(arrays), encoded, [elapsed * count / total for count in counts]


def is_transient(error: BaseException) -> bool:
    """An I/O error worth retrying: a dropped connection or a timeout, not a missing file or
    a refused permission (those will not change by waiting)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionError | TimeoutError):
            return True
        if isinstance(cause, OSError) and not isinstance(
            cause, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
        ):
            return True
        cause = cause.__cause__
    return False


def with_retries(call: Callable[[], T], attempts: int, backoff_seconds: float) -> T:
    """``call()``, again after 1x, 2x, 4x ... ``backoff_seconds`` while it fails transiently."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:
            if attempt == attempts - 1 or not is_transient(error.__cause__ or error):
                raise
            time.sleep(backoff_seconds * 2**attempt)
    raise AssertionError("unreachable")


def actor_options(ray_settings: Any) -> dict[str, Any]:
    """``ray.remote`` options of an encoder from :class:`flows.settings.RaySettings`."""
    return {
        "num_cpus": ray_settings.cpus_per_worker,
        "num_gpus": ray_settings.gpus_per_worker,
        "max_restarts": ray_settings.max_restarts,
        "max_task_retries": ray_settings.max_restarts,
    }
