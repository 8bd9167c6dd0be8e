"""One way to reach any fsspec URI (local path, ``file://``, ``s3://``) from storage/.

Every storage function takes a URI plus ``storage_options`` (passed to fsspec, e.g.
``{"endpoint_url": "http://127.0.0.1:5000"}`` for an S3 server that is not AWS) and turns them
into an fsspec filesystem and a path inside it here, so that local and object stores follow
the same code. Writes that must be atomic go through :func:`write_atomic`.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec import AbstractFileSystem

__all__ = ["is_local", "join", "open_fs", "pyarrow_filesystem", "to_uri", "write_atomic"]

StorageOptions = dict[str, Any]


def open_fs(
    uri: str, storage_options: StorageOptions | None = None
) -> tuple[AbstractFileSystem, str]:
    """The filesystem holding ``uri`` and the path of ``uri`` inside it (no trailing slash)."""
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    path = str(path)
    return fs, path.rstrip("/") or path


def is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "file" in protocols or "local" in protocols


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def to_uri(fs: AbstractFileSystem, path: str) -> str:
    """A URI naming ``path`` that any fsspec user can open: a plain path for local files."""
    if is_local(fs):
        return path
    return str(fs.unstrip_protocol(path))


def pyarrow_filesystem(fs: AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow filesystem over ``fs`` (pyarrow's own for local files, fsspec's otherwise),
    so pyarrow and DuckDB read exactly what fsspec sees, with the same credentials."""
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that no reader ever sees part of it.

    Local files: written under a hidden temporary name in the same directory, flushed, then
    renamed over ``path`` (``os.replace`` is atomic on POSIX). Object stores: one PUT (or a
    multipart upload, completed in one step), which S3 makes visible all at once or not at all;
    a rename there would be a copy plus a delete, which is not atomic.
    """
    if is_local(fs):
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    fs.pipe_file(path, data)
