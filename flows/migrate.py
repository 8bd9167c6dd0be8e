"""The migration flow: a PACS export in, a Radiarc archive out (Prefect 3 in the driver, Ray
actors for the work).

    scan the export (streaming)  ->  skip what the manifests say is done  ->  batch
      ->  Ray encoder actors: read, encode the batch's tiles together, write chunks, verify
      ->  manifest parts (atomic, every ``flush_rows`` images or ``flush_seconds``)  ->  report

Only the driver talks to Prefect; the encoders (flows/actors.py) never import it. In-flight
work is bounded (``ray.in_flight`` batches) and the scan is a generator, so memory stays flat
however large the export. Prefect tasks wrap the steps that touch storage from the driver
(archive layout, the resume query, manifest parts, the report) and retry them with
exponential backoff on transient I/O errors only; encoding is never retried, its failures are
recorded per image. Reads inside the encoders retry the same way (:func:`flows.actors.with_retries`)
and a crashed encoder is restarted with its batch (``ray.max_restarts``).

A run killed at any point can simply be started again: images are recorded only after their
array is written and verified, the resume query skips what is recorded, and an array without a
row is overwritten. See docs/flows.md.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task, exponential_backoff

from flows.actors import STAGES, BatchResult, Encoder, EncoderJob, actor_options
from flows.failpoints import FailPoints
from flows.progress import ProgressSink, current
from flows.settings import MigrationSettings, refuse_credentials
from storage.archive import Archive, RunContext
from storage.audit import connect, summary
from storage.manifest import Done, ManifestRow, ManifestWriter, done_instances, skipped_sources
from storage.report import Report, RunTotals, write_report
from storage.retry import is_transient
from storage.scan import ScanItem, count_files, scan

__all__ = ["RunSummary", "migrate", "migrate_flow", "new_run_id"]

ARTIFACT_KEY = "radiarc-migration-report"
_LOG_EVERY_SECONDS = 30.0
log = logging.getLogger(__name__)


def _transient_failure(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a task only when it failed on an I/O error worth retrying."""
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False


_IO_TASK: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=1),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _transient_failure,
    "cache_policy": NO_CACHE,
}


@task(name="prepare-archive", **_IO_TASK)
def prepare_archive(archive_uri: str, options: dict[str, Any]) -> None:
    """Create the archive's root group and manifest folder if they are missing."""
    Archive(archive_uri, options)


@task(name="query-done", **_IO_TASK)
def query_done(
    archive_uri: str, codec_key: str, options: dict[str, Any], retry_skipped: bool
) -> tuple[Done, frozenset[str]]:
    """What earlier runs finished with this codec configuration, and sources they found
    unarchivable (empty with ``retry_skipped``)."""
    done = done_instances(archive_uri, codec_key, options)
    settled = frozenset() if retry_skipped else skipped_sources(archive_uri, options)
    return done, settled


@task(name="write-manifest-part", **_IO_TASK)
def write_manifest_part(writer: ManifestWriter) -> str | None:
    """The rows collected so far as one atomic Parquet part."""
    return writer.flush()


@task(name="write-report", **_IO_TASK)
def publish_report(
    archive: Archive, totals: RunTotals, source_options: dict[str, Any], worst: int, crop: int
) -> Report:
    """The run's report into the archive, and as a Prefect markdown artifact."""
    report = write_report(
        archive, totals, source_options=source_options, worst_images=worst, crop=crop
    )
    create_markdown_artifact(
        markdown=f"Full report with plots: `{report.uri}`\n\n{report.markdown}",
        key=ARTIFACT_KEY,
        description=f"Radiarc migration {totals.run_id}",
    )
    return report


@dataclass(frozen=True)
class RunSummary:
    """What a run did, for the command line's table and for callers."""

    run_id: str
    files_listed: int | None
    archived: int
    skipped: int
    failed: int
    already_done: int
    settled_skips: int
    not_dicom: int
    source_bytes: int
    pixel_bytes: int
    stored_bytes: int
    tiles: int
    wall_seconds: float
    stage_seconds: dict[str, float]
    peak_worker_rss_mb: float
    peak_driver_rss_mb: float
    workers: list[str]
    median_psnr: float | None = None
    median_ssim: float | None = None
    report_uri: str | None = None

    @property
    def processed(self) -> int:
        return self.archived + self.skipped + self.failed

    @property
    def images_per_minute(self) -> float:
        return 60 * self.processed / max(self.wall_seconds, 1e-9)

    @property
    def source_mb_per_second(self) -> float:
        return self.source_bytes / 1e6 / max(self.wall_seconds, 1e-9)

    @property
    def ratio(self) -> float | None:
        return self.pixel_bytes / self.stored_bytes if self.stored_bytes else None


@dataclass
class _Tally:
    """Counts, bytes and timings of the run so far; forwards progress to the sink."""

    sink: ProgressSink
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("archived", "skipped", "failed", "done before", "not DICOM"), 0
        )
    )
    not_dicom: dict[str, int] = field(default_factory=dict)
    settled_skips: int = 0
    source_bytes: int = 0
    pixel_bytes: int = 0
    stored_bytes: int = 0
    tiles: int = 0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    peak_worker_rss_mb: float = 0.0
    files_listed: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set_total(self, files: int) -> None:
        with self.lock:
            self.files_listed = files
            self.sink.set_total(files)

    def on_not_dicom(self, _uri: str, reason: str) -> None:  # never log the URI: PHI
        with self.lock:
            self.not_dicom[reason] = self.not_dicom.get(reason, 0) + 1
            self.counts["not DICOM"] += 1
            self.sink.advance(1, 0, self.counts)

    def on_done_before(self, settled: bool) -> None:
        with self.lock:
            self.counts["done before"] += 1
            self.settled_skips += settled
            self.sink.advance(1, 0, self.counts)

    def on_result(self, result: BatchResult) -> None:
        with self.lock:
            read = 0
            for row in result.rows:
                self.counts[row.status] += 1
                read += row.source_bytes or 0
                if row.status == "archived":
                    self.pixel_bytes += row.pixel_bytes or 0
                    self.stored_bytes += (row.archived_bytes or 0) + (row.metadata_bytes or 0)
            self.source_bytes += read
            self.tiles += result.tiles
            for stage, seconds in result.seconds.items():
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
            self.peak_worker_rss_mb = max(self.peak_worker_rss_mb, result.peak_rss_mb)
            self.sink.advance(len(result.rows), read, self.counts)


def new_run_id() -> str:
    """UTC time to the second plus 6 random hex digits: sortable and unique."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


@flow(name="radiarc-migrate", validate_parameters=True)
def migrate_flow(
    source: str,
    archive: str,
    settings: dict[str, Any] | None = None,
    config_file: str | None = None,
) -> RunSummary:
    """Migrate the DICOM export at ``source`` into the Radiarc archive at ``archive``.

    ``settings`` overrides (nested like :class:`flows.settings.MigrationSettings`) take
    precedence over ``RADIARC_...`` environment variables, then over ``config_file``.
    Storage credentials are refused here: Prefect stores flow parameters (see
    :func:`flows.settings.refuse_credentials`).
    """
    refuse_credentials(settings, "the flow's parameters")
    return migrate(source, archive, MigrationSettings.load(config_file, settings))


def migrate(source: str, archive_uri: str, config: MigrationSettings) -> RunSummary:
    """The flow's body (call it inside a flow run: it uses Prefect tasks and its logger)."""
    logger = get_run_logger()
    started = time.perf_counter()
    run_id = config.run_id or new_run_id()
    archive_settings = config.codec.archive_settings()
    prepare_archive(archive_uri, config.archive_options)
    done, settled = query_done(
        archive_uri, archive_settings.codec_key(), config.archive_options, config.retry_skipped
    )
    logger.info(  # no URIs in logs: an export's folders may be named after patients
        "run %s, %s: %d images already archived with this configuration",
        run_id,
        archive_settings.rate.describe(),
        len(done.sop_instance_uids),
    )
    tally = _Tally(current())
    threading.Thread(
        target=_count_listing, args=(source, config.source_options, tally), daemon=True
    ).start()
    job = EncoderJob(
        source_uri=source,
        archive_uri=archive_uri,
        archive_settings=archive_settings,
        context=RunContext.from_env(run_id),
        source_options=config.source_options,
        archive_options=config.archive_options,
        device=_device(config),
        torch_threads=config.ray.torch_threads or max(1, int(config.ray.cpus_per_worker)),
        tile_batch=config.ray.tile_batch,
        failpoints=FailPoints.from_env(),
    )
    pool = _EncoderPool(config, job)
    scanned = scan(source, config.source_options, on_skip=tally.on_not_dicom)
    batches = _batches(_pending(scanned, done, settled, tally), config.ray.batch_images)
    try:
        _archive_all(pool, batches, job, config, tally)
    finally:
        pool.close()
    wall = time.perf_counter() - started
    totals = RunTotals(
        run_id=run_id,
        wall_seconds=wall,
        files_listed=tally.files_listed,
        already_done=tally.counts["done before"] - tally.settled_skips,
        settled_skips=tally.settled_skips,
        not_dicom=dict(tally.not_dicom),
        stage_seconds=dict(tally.stage_seconds),
        settings={
            "rate": archive_settings.rate.describe(),
            "model": archive_settings.model_id,
            "tile": f"{archive_settings.tile_size} px",
            "encoders": f"{config.ray.workers} x ({config.ray.cpus_per_worker:g} CPU, "
            f"{config.ray.gpus_per_worker:g} GPU)",
        },
    )
    report = None
    if config.report.enabled:
        report = publish_report(
            Archive(archive_uri, config.archive_options, create=False),
            totals,
            config.source_options,
            config.report.worst_images,
            config.report.crop,
        )
    psnr, ssim = _medians(archive_uri, config.archive_options, run_id)
    logger.info("finished: %s in %.1f s", _counts_text(tally), wall)
    return RunSummary(
        run_id=run_id,
        files_listed=tally.files_listed,
        archived=tally.counts["archived"],
        skipped=tally.counts["skipped"],
        failed=tally.counts["failed"],
        already_done=totals.already_done,
        settled_skips=tally.settled_skips,
        not_dicom=tally.counts["not DICOM"],
        source_bytes=tally.source_bytes,
        pixel_bytes=tally.pixel_bytes,
        stored_bytes=tally.stored_bytes,
        tiles=tally.tiles,
        wall_seconds=wall,
        stage_seconds=dict(tally.stage_seconds),
        peak_worker_rss_mb=tally.peak_worker_rss_mb,
        peak_driver_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        workers=pool.workers,
        median_psnr=psnr,
        median_ssim=ssim,
        report_uri=report.uri if report else None,
    )


def _archive_all(
    pool: _EncoderPool,
    batches: Iterable[list[ScanItem]],
    job: EncoderJob,
    config: MigrationSettings,
    tally: _Tally,
) -> None:
    """Every batch through the encoders; their rows into manifest parts, each part written
    once ``flush_rows`` rows or ``flush_seconds`` have gathered, the last one also when the
    run is interrupted (what is recorded is what a resumed run skips)."""
    logger = get_run_logger()
    writer = ManifestWriter(
        job.archive_uri,
        job.context.run_id,
        storage_options=job.archive_options,
        batch_rows=2**31 - 1,  # parts are cut here, by count and by age
    )
    unwritten, oldest, last_log = 0, time.monotonic(), time.monotonic()
    try:
        for batch, outcome in _dispatch(pool, batches, config.ray.max_in_flight()):
            result = outcome if isinstance(outcome, BatchResult) else _lost(batch, job, outcome)
            for row in result.rows:
                writer.add(row)
            tally.on_result(result)
            if unwritten == 0:
                oldest = time.monotonic()
            unwritten += len(result.rows)
            now = time.monotonic()
            age = now - oldest
            if unwritten >= config.manifest.flush_rows or age >= config.manifest.flush_seconds:
                write_manifest_part(writer)
                unwritten = 0
            if now - last_log >= _LOG_EVERY_SECONDS:
                logger.info("progress: %s", _counts_text(tally))
                last_log = now
    finally:
        write_manifest_part(writer)


def _device(config: MigrationSettings) -> str:
    """``auto``: CUDA exactly when the encoders are given GPUs."""
    if config.ray.device != "auto":
        return config.ray.device
    return "cuda" if config.ray.gpus_per_worker > 0 else "cpu"


class _EncoderPool:
    """Ray and the encoder actors, started when the first batch needs them (a run with
    nothing left to do starts neither), stopped at the end. An encoder that died for good
    (its own restarts spent) is replaced by a fresh one, up to ``replacements`` times."""

    def __init__(self, config: MigrationSettings, job: EncoderJob) -> None:
        self.config = config
        self.job = job
        self.actors: list[Any] = []
        self.generations: list[int] = []
        self.workers: list[str] = []
        self.started_ray = False
        self.replacements = max(4, 2 * config.ray.workers)

    def start(self) -> list[Any]:
        if not self.actors:
            self.started_ray = _connect_ray(self.config)
            self.actors = [self._new_actor() for _ in range(self.config.ray.workers)]
            self.generations = [0] * len(self.actors)
            self.workers = ray.get([actor.ready.remote() for actor in self.actors])
            get_run_logger().info(
                "%d encoders ready: %s", len(self.workers), ", ".join(self.workers)
            )
        return self.actors

    def _new_actor(self) -> Any:
        return ray.remote(Encoder).options(**actor_options(self.config.ray)).remote(self.job)

    def replace(self, position: int, generation: int) -> None:
        """A fresh encoder at ``position`` if the one of ``generation`` is still there."""
        if self.generations[position] != generation:
            return  # already replaced, for another batch it had
        if self.replacements == 0:
            raise EncodersLostError(
                "encoders keep dying even after replacement; stopping the run (the rows "
                "written so far are kept; a new run resumes from them)"
            )
        self.replacements -= 1
        ray.kill(self.actors[position])
        self.actors[position] = self._new_actor()
        self.generations[position] += 1
        get_run_logger().warning(
            "encoder %d died; replaced it (%d replacements left)", position, self.replacements
        )

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


class EncodersLostError(RuntimeError):
    """Encoders died more often than the pool will replace them."""


def _connect_ray(config: MigrationSettings) -> bool:
    """Join the configured cluster, or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    address = config.ray_address()
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",
            logging_level=logging.WARNING,
            num_cpus=config.ray.local_cpus,
            include_dashboard=False,
            object_store_memory=config.ray.object_store_mb * 2**20,
            log_to_driver=False,
        )
    return True


def _count_listing(source: str, options: dict[str, Any], tally: _Tally) -> None:
    try:
        tally.set_total(count_files(source, options))
    except Exception as error:  # the bar then shows no total; the run goes on
        log.debug("listing for the progress total failed: %s", type(error).__name__)


def _pending(
    items: Iterable[ScanItem], done: Done, settled: frozenset[str], tally: _Tally
) -> Iterator[ScanItem]:
    """Scanned files not yet archived with this configuration, each content once."""
    seen: set[str] = set()
    for item in items:
        checksum = item.checksum
        if checksum in done or checksum in settled or checksum in seen:
            tally.on_done_before(checksum in settled)
            continue
        if checksum:
            seen.add(checksum)
        yield item


def _batches(items: Iterable[ScanItem], size: int) -> Iterator[list[ScanItem]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _dispatch(
    pool: _EncoderPool, batches: Iterable[list[ScanItem]], in_flight: int
) -> Iterator[tuple[list[ScanItem], BatchResult | BaseException]]:
    """Each batch to the least busy encoder, at most ``in_flight`` outstanding; results in
    the order they finish. Only then is the next batch taken from the (lazy) scan."""
    dispatcher = _Dispatcher(pool, in_flight)
    for batch in batches:
        if not dispatcher.load:
            dispatcher.load = [0] * len(pool.start())
        while not dispatcher.has_room():
            yield from dispatcher.finish_one()
        dispatcher.submit(batch)
    while dispatcher.busy():
        yield from dispatcher.finish_one()


@dataclass
class _Task:
    batch: list[ScanItem]
    position: int
    generation: int
    alone: bool  # a suspect run on an encoder with nothing else to do


class _Dispatcher:
    """Batches in flight on the encoders, and what to do when an encoder dies for good.

    Every batch that was on a dead encoder is a suspect: one of its files may be what killed
    it (a native decoder's crash). Their files are run again one at a time, each alone on an
    idle (fresh) encoder, so that the file that kills encoders is identified and fails alone
    while the others are archived."""

    def __init__(self, pool: _EncoderPool, in_flight: int) -> None:
        self.pool = pool
        self.in_flight = in_flight
        self.pending: dict[Any, _Task] = {}
        self.suspects: deque[ScanItem] = deque()
        self.load: list[int] = []

    def has_room(self) -> bool:
        self._run_suspects()
        return len(self.pending) < self.in_flight and bool(self._open_loads())

    def busy(self) -> bool:
        self._run_suspects()
        return bool(self.pending or self.suspects)

    def submit(self, batch: list[ScanItem], alone: bool = False) -> None:
        candidates = [i for i, load in enumerate(self.load) if not self._isolated(i)]
        position = min(candidates, key=self.load.__getitem__)
        ref = self.pool.actors[position].process.remote(batch)
        self.pending[ref] = _Task(batch, position, self.pool.generations[position], alone)
        self.load[position] += 1

    def finish_one(self) -> Iterator[tuple[list[ScanItem], BatchResult | BaseException]]:
        ready, _ = ray.wait(list(self.pending), num_returns=1)
        for ref in ready:
            task = self.pending.pop(ref)
            self.load[task.position] -= 1
            try:
                yield task.batch, ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self.pool.replace(task.position, task.generation)
                if task.alone:
                    yield task.batch, error  # it killed an encoder on its own: the culprit
                else:
                    self.suspects.extend(task.batch)
            except ray.exceptions.RayError as error:
                yield task.batch, error

    def _isolated(self, position: int) -> bool:
        return any(t.alone and t.position == position for t in self.pending.values())

    def _open_loads(self) -> list[int]:
        return [load for i, load in enumerate(self.load) if not self._isolated(i)]

    def _run_suspects(self) -> None:
        """Each suspect alone on an idle encoder, while one is idle."""
        while self.suspects:
            idle = [i for i, load in enumerate(self.load) if load == 0]
            if not idle:
                return
            self.submit([self.suspects.popleft()], alone=True)


def _lost(batch: list[ScanItem], job: EncoderJob, error: BaseException) -> BatchResult:
    """Failed rows for a batch whose encoder died for good (the next run retries them)."""
    reason = f"encoder lost while archiving this file: {type(error).__name__}"
    log.warning("%d files failed: %s", len(batch), reason)
    now = datetime.now(UTC)
    rows = [
        ManifestRow(
            run_id=job.context.run_id,
            status="failed",
            timestamp=now,
            worker=job.context.worker,
            reason=reason,
            source_uri=item.uri,
            source_checksum=item.checksum,
            source_bytes=item.size,
        )
        for item in batch
    ]
    return BatchResult(rows, {}, 0, 0.0, job.context.worker)


def _counts_text(tally: _Tally) -> str:
    total = "?" if tally.files_listed is None else str(tally.files_listed)
    settled = sum(tally.counts.values())
    parts = ", ".join(f"{name} {value}" for name, value in tally.counts.items())
    return f"{settled}/{total} files ({parts})"


def _medians(
    archive_uri: str, options: dict[str, Any], run_id: str
) -> tuple[float | None, float | None]:
    quality = summary(connect(archive_uri, options, run_id=run_id))["quality"].to_pylist()
    medians = {row["metric"]: row["p50"] for row in quality}
    return medians.get("psnr"), medians.get("ssim")
