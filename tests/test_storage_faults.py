"""Storage faults during a real migration from S3 to S3: the S3 server stopped and started
again mid-run, throttling and 5xx answers, bodies cut short, and an object that never reads.
Reads and writes retry with backoff, a file that still fails gets a ``failed`` row naming the
error, no array is marked complete without its ``archived`` row (nor the reverse), and the next
run archives what the faults stopped, each image exactly once.

The S3 server is moto's, in this process (its buckets survive a restart, as a real server's
disks would); faults other than the outage come from storage.faults.S3FaultProxy, a real HTTP
proxy between the client and the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import s3fs
from storage_helpers import small_pngs

from flows.migrate import RunSummary, migrate_flow
from storage.faults import FaultPlan, RestartableMotoServer, S3FaultProxy
from storage.invariants import archive_invariants
from storage.manifest import read_manifest
from storage.synth import write_export

pytestmark = pytest.mark.usefixtures("prefect_api", "local_ray")

IMAGES = 8
#: Few retries inside botocore, so that faults reach Radiarc's own retries quickly.
CLIENT_RETRIES: dict[str, Any] = {"config_kwargs": {"retries": {"max_attempts": 2}}}


@pytest.fixture(scope="module")
def s3_server(s3_endpoint: str) -> Iterator[RestartableMotoServer]:
    """A second moto server (credentials come from the session's ``s3_endpoint``)."""
    server = RestartableMotoServer().start()
    yield server
    server.stop()


def s3_export(endpoint: str, bucket: str, images: int, side: int = 96) -> list[str]:
    """A new bucket holding an export of ``images`` DICOMs under ``export/``."""
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
    return write_export(
        f"s3://{bucket}/export",
        small_pngs(images, side=side),
        storage_options={"endpoint_url": endpoint},
    )


def migrate(bucket: str, endpoint: str, **extra: Any) -> RunSummary:
    options = {"endpoint_url": endpoint, "skip_instance_cache": True, **CLIENT_RETRIES}
    settings = {
        "codec": {"tile_size": 32, "rate": {"iterations": 2}},
        "ray": {"workers": 2, "cpus_per_worker": 0.5, "batch_images": 2},
        "manifest": {"flush_rows": 2},
        "report": {"enabled": False},
        "source_options": options,
        "archive_options": options,
        **extra,
    }
    return migrate_flow(f"s3://{bucket}/export", f"s3://{bucket}/archive", settings=settings)


def check_archive(bucket: str, endpoint: str) -> dict[str, str]:
    """The invariants hold; returns the latest status per source."""
    invariants = archive_invariants(f"s3://{bucket}/archive", {"endpoint_url": endpoint})
    assert invariants.hold, invariants
    return invariants.latest


def test_s3_server_stopped_and_restarted_mid_run(s3_server: RestartableMotoServer) -> None:
    bucket = "outage"
    s3_export(s3_server.url, bucket, IMAGES)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.url, skip_instance_cache=True)
    outages: list[float] = []

    def outage() -> None:
        deadline = time.monotonic() + 120
        while not fs.exists(f"{bucket}/archive/manifests") and time.monotonic() < deadline:
            time.sleep(0.1)
        s3_server.stop()
        started = time.monotonic()
        time.sleep(3)
        s3_server.start()
        outages.append(time.monotonic() - started)

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        first = migrate(bucket, s3_server.url)
    finally:
        thread.join()
    assert outages, "the server was never stopped"
    assert first.archived + first.failed == IMAGES
    assert set(check_archive(bucket, s3_server.url).values()) <= {"archived", "failed"}

    second = migrate(bucket, s3_server.url)
    assert second.already_done == first.archived and second.failed == 0
    assert set(check_archive(bucket, s3_server.url).values()) == {"archived"}


def test_throttling_server_errors_and_short_reads(s3_server: RestartableMotoServer) -> None:
    bucket = "flaky"
    s3_export(s3_server.url, bucket, IMAGES)
    plan = FaultPlan(error_rate=0.15, error_status=503, short_read_rate=0.15)
    proxy = S3FaultProxy(s3_server.url, plan, seed=7).start()
    try:
        first = migrate(bucket, proxy.url)
        injected = dict(proxy.counts)
        proxy.plan = FaultPlan(error_rate=0.1, error_status=500)
        second = migrate(bucket, proxy.url)
    finally:
        proxy.stop()
    assert injected["error 503"] > 0 and injected["short read"] > 0
    assert first.archived + first.failed == IMAGES
    assert second.already_done + second.archived + second.failed == IMAGES
    check_archive(bucket, s3_server.url)
    third = migrate(bucket, s3_server.url)  # faults gone: whatever is left is archived
    assert third.failed == 0
    assert set(check_archive(bucket, s3_server.url).values()) == {"archived"}


def test_an_object_that_never_reads_fails_with_its_reason(
    s3_server: RestartableMotoServer,
) -> None:
    bucket = "unreadable"
    paths = s3_export(s3_server.url, bucket, 4, side=64)
    victim = paths[1].split(f"{bucket}/", 1)[1]
    plan = FaultPlan(
        error_rate=1.0, error_status=500, paths=frozenset({victim}), methods=frozenset({"GET"})
    )
    with_proxy = S3FaultProxy(s3_server.url, plan).start()
    try:
        started = time.monotonic()
        summary = migrate(bucket, with_proxy.url)
        elapsed = time.monotonic() - started
    finally:
        with_proxy.stop()
    assert (summary.archived, summary.failed) == (3, 1)
    rows = read_manifest(f"s3://{bucket}/archive", {"endpoint_url": s3_server.url}).to_pylist()
    (failed,) = [row for row in rows if row["status"] == "failed"]
    assert failed["reason"].startswith("cannot read")
    assert elapsed < 120, f"retries are not bounded: {elapsed:.0f} s"
    check_archive(bucket, s3_server.url)
