"""Shared fixtures: small real X-ray crops at several bit depths, for fast codec tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codec.io import GrayImage, read_png

DATA = Path(__file__).parent / "data"


def deepened(pixels: np.ndarray, bits_stored: int, seed: int = 0) -> GrayImage:
    """An 8-bit image widened to ``bits_stored`` bits, the new low bits filled with noise,
    as a detector's would be (so a codec cannot win by spotting empty bit planes)."""
    shift = bits_stored - 8
    noise = np.random.default_rng(seed).integers(0, 1 << shift, pixels.shape)
    return GrayImage((pixels.astype(np.uint32) << shift | noise).astype(np.uint16), bits_stored)


@pytest.fixture(scope="session")
def xray_8bit() -> GrayImage:
    """A 256x256 crop of a real NIH chest X-ray (lung, rib and soft-tissue edges)."""
    full = read_png(DATA / "00007617_000.png")
    return GrayImage(np.ascontiguousarray(full.pixels[384:640, 256:512]), 8)


@pytest.fixture(scope="session")
def xray_10bit(xray_8bit: GrayImage) -> GrayImage:
    return deepened(xray_8bit.pixels, 10)


@pytest.fixture(scope="session")
def xray_12bit(xray_8bit: GrayImage) -> GrayImage:
    return deepened(xray_8bit.pixels, 12)


@pytest.fixture(scope="session")
def xray_16bit(xray_8bit: GrayImage) -> GrayImage:
    return deepened(xray_8bit.pixels, 16)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def chest_xray() -> GrayImage:
    """A real 1024x1024 8-bit NIH chest radiograph."""
    return read_png(DATA / "00007617_000.png")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1, with dummy credentials in the environment
    (subprocesses inherit them). Pass the URL as ``endpoint_url`` to s3fs / zarr's FsspecStore."""
    from storage.bench import moto_server

    with moto_server() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """A fresh, empty bucket on the moto server: (its name, fsspec storage options)."""
    import re

    import s3fs

    options = {"endpoint_url": s3_endpoint}
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"t-{abs(hash(request.node.nodeid)) % 10**8}-{name}"[:63].rstrip("-")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    return bucket, options


@pytest.fixture(scope="module")
def one_thread_torch() -> Iterator[None]:
    """Small tiles on a shared 2-core machine run many times faster on one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Prefect's test harness for the session: a temporary API server and database. Yields its
    URL, which subprocesses reach through PREFECT_API_URL (no ephemeral server of their own)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def local_ray(s3_endpoint: str) -> Iterator[str]:
    """A local Ray of 2 CPUs for a test module; yields its GCS address (for RAY_ADDRESS).
    Started after the S3 fixture, so its workers inherit the S3 test credentials."""
    import logging

    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 * 2**20,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ sources are read-only


class SourceGuard:
    """SHA-256 of every file under an export (any fsspec URI), taken when it is made;
    :meth:`check` fails naming each file added, removed or changed since, and each folder
    added or removed. "Sources are read-only" (DESIGN.md) made checkable."""

    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        from storage.fsutil import open_fs

        self.uri = str(uri)
        self.fs, self.root = open_fs(self.uri, storage_options)
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, str]:
        """Relative path -> ``sha256:<hex>`` for files, ``dir`` for folders, the type for
        anything else (a named pipe is never opened: that would block)."""
        self.fs.invalidate_cache()
        root = self.root.rstrip("/")
        found = self.fs.find(root, withdirs=True, detail=True)
        state: dict[str, str] = {}
        for name, info in found.items():
            relative = str(name)[len(root) :].lstrip("/")
            if not relative:
                continue
            if info.get("type") == "directory":
                state[relative] = "dir"
            elif info.get("type") != "file":
                state[relative] = str(info.get("type"))
            else:
                state[relative] = "sha256:" + hashlib.sha256(self.fs.cat_file(name)).hexdigest()
        return state

    def changes(self) -> list[str]:
        after = self.snapshot()
        problems = [f"removed: {path}" for path in sorted(set(self.before) - set(after))]
        problems += [f"added: {path}" for path in sorted(set(after) - set(self.before))]
        problems += [
            f"changed: {path}"
            for path in sorted(set(self.before) & set(after))
            if self.before[path] != after[path]
        ]
        return problems

    def check(self) -> None:
        problems = self.changes()
        if problems:
            shown = "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else "")
            raise AssertionError(f"source export {self.uri} was modified: {shown}")


@pytest.fixture(scope="session", autouse=True)
def tests_data_unchanged() -> Iterator[None]:
    """The committed sample files (tests/data) are the same at the end of the session."""
    guard = SourceGuard(DATA)
    yield
    guard.check()


@pytest.fixture
def guarded_export() -> Iterator[Callable[..., SourceGuard]]:
    """``guarded_export(uri, storage_options=None)``, called once an export is written and
    before it is migrated, checksums it; the test's teardown asserts it is unchanged (call
    ``.check()`` on the returned guard to assert earlier)."""
    guards: list[SourceGuard] = []

    def guard(uri: str | Path, storage_options: dict[str, Any] | None = None) -> SourceGuard:
        guards.append(SourceGuard(uri, storage_options))
        return guards[-1]

    yield guard
    for made in guards:
        made.check()
