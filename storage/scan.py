"""Find the DICOM files of a PACS export at any fsspec URI, streaming, by content.

:func:`scan` is a generator: it lists the export one page at a time (a local directory's
entries as ``os.scandir`` yields them, S3 keys 1,000 per ``ListObjectsV2`` page, other
filesystems one directory at a time), reads the first :data:`storage.dicom.SNIFF_BYTES` bytes
of each file and yields those that look like DICOM (``DICM`` at offset 128, or a plausible
preamble-less ACR-NEMA element) whatever their name. Memory stays bounded by one page however
many objects the export holds, and the first item arrives before the listing is finished.

Every :class:`ScanItem` carries a checksum that identifies the bytes: the S3 ETag when the
store provides one (free with the listing), else a SHA-256 of the content (local files are
read once more for it; pass ``hash_content=False`` to skip that and leave it to the reader).
Files that are not DICOM, cannot be read, or are larger than :data:`MAX_SOURCE_BYTES`
(the reader would hold them whole in memory) are passed to ``on_skip`` with a reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

from fsspec import AbstractFileSystem

from storage.dicom import MAX_PIXELS, SNIFF_BYTES, is_dicom
from storage.fsutil import StorageOptions, is_local, open_fs, to_uri
from storage.retry import is_transient, with_retries

__all__ = ["MAX_SOURCE_BYTES", "PAGE_SIZE", "ScanItem", "count_files", "scan", "scan_fs"]

#: Objects listed and sniffed together; also S3's ListObjectsV2 page size.
PAGE_SIZE = 1000
#: Largest file handed on: the largest single-frame image (16-bit, MAX_PIXELS) plus room for
#: its header. A reader fetches a whole file into memory; anything bigger (a multi-frame
#: tomosynthesis series, a video) would only be refused after costing that much memory.
MAX_SOURCE_BYTES = 2 * MAX_PIXELS + 64 * 1024 * 1024
#: Tries of a listing page or a file's first bytes when the store fails in passing.
LIST_ATTEMPTS = 4
BACKOFF_SECONDS = 0.5
_HASH_BLOCK = 1 << 20

SkipHandler = Callable[[str, str], None]


@dataclass(frozen=True)
class ScanItem:
    """One file recognised as DICOM: where it is, how big, and what identifies its bytes."""

    uri: str  # what to show and record (a plain path for local files, else scheme://...);
    # bytes of a local name that are not UTF-8 appear as \xNN (manifests are UTF-8)
    path: str  # the same file as a path inside the scanned filesystem
    size: int
    etag: str | None = None
    sha256: str | None = None

    @property
    def checksum(self) -> str | None:
        """``etag:<etag>`` or ``sha256:<hex>``, whichever is known (the ETag first)."""
        if self.etag:
            return f"etag:{self.etag}"
        if self.sha256:
            return f"sha256:{self.sha256}"
        return None


def scan(
    uri: str,
    storage_options: StorageOptions | None = None,
    *,
    hash_content: bool = True,
    on_skip: SkipHandler | None = None,
) -> Iterator[ScanItem]:
    """DICOM files under ``uri`` (a directory, prefix or single file), recursively."""
    fs, root = open_fs(uri, storage_options)
    yield from scan_fs(fs, root, hash_content=hash_content, on_skip=on_skip)


def scan_fs(
    fs: AbstractFileSystem,
    root: str,
    *,
    hash_content: bool = True,
    on_skip: SkipHandler | None = None,
) -> Iterator[ScanItem]:
    """:func:`scan` over a filesystem already open."""
    skip = on_skip or (lambda _uri, _reason: None)
    for page in _pages(_list_files(fs, root), PAGE_SIZE):
        yield from _sniff_page(fs, page, hash_content, skip)


def count_files(uri: str, storage_options: StorageOptions | None = None) -> int:
    """How many files :func:`scan` will look at under ``uri``: the listing alone (no reads),
    cheap enough to run beside a scan for a progress bar's total."""
    fs, root = open_fs(uri, storage_options)
    return sum(1 for _ in _list_files(fs, root))


@dataclass(frozen=True)
class _Listed:
    path: str
    size: int
    etag: str | None


def _pages(entries: Iterable[_Listed], size: int) -> Iterator[list[_Listed]]:
    iterator = iter(entries)
    while page := list(islice(iterator, size)):
        yield page


def _list_files(fs: AbstractFileSystem, root: str) -> Iterator[_Listed]:
    if is_local(fs):
        yield from _list_local(root)
    elif "s3" in _protocols(fs) and hasattr(fs, "call_s3"):
        yield from _list_s3(fs, root)
    else:
        yield from _list_generic(fs, root)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _list_local(root: str) -> Iterator[_Listed]:
    """Depth-first over ``os.scandir``, one open directory iterator per level; symlinked
    directories are not followed (no loops), symlinked files are."""
    if os.path.isfile(root):
        yield _Listed(root, os.path.getsize(root), None)
        return
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file():
                            yield _Listed(entry.path, entry.stat().st_size, None)
                    except OSError:
                        continue  # vanished or unreadable entry; nothing to archive
        except OSError:
            continue


def _list_s3(fs: Any, root: str) -> Iterator[_Listed]:
    """Every key under ``root`` via ListObjectsV2 pages, without a delimiter: one request per
    1,000 keys whatever the depth, and nothing kept but the current page."""
    bucket, _, key = root.partition("/")
    if key and not key.endswith("/"):
        try:
            info = fs.info(root)
        except FileNotFoundError:
            info = None
        if info is not None and info.get("type") == "file":
            yield _Listed(root, int(info["size"]), _etag(info))
            return
        key += "/"
    token: str | None = None
    while True:
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": key, "MaxKeys": PAGE_SIZE}
        if token:
            request["ContinuationToken"] = token
        page = with_retries(
            partial(fs.call_s3, "list_objects_v2", **request), LIST_ATTEMPTS, BACKOFF_SECONDS
        )
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                yield _Listed(f"{bucket}/{item['Key']}", int(item["Size"]), _etag(item))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def _list_generic(fs: AbstractFileSystem, root: str) -> Iterator[_Listed]:
    """Directory by directory with ``fs.ls`` for filesystems without a streaming listing."""
    if fs.isfile(root):
        info = fs.info(root)
        yield _Listed(root, int(info.get("size") or 0), _etag(info))
        return
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = fs.ls(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for info in entries:
            name = str(info["name"])
            if info.get("type") == "directory":
                if name.rstrip("/") != directory.rstrip("/"):
                    stack.append(name)
            else:
                yield _Listed(name, int(info.get("size") or 0), _etag(info))


def _etag(info: dict[str, Any]) -> str | None:
    value = info.get("ETag") or info.get("etag")
    return str(value).strip('"') or None if value else None


def _sniff_page(
    fs: AbstractFileSystem, page: list[_Listed], hash_content: bool, skip: SkipHandler
) -> Iterator[ScanItem]:
    """Read the head of every file of ``page`` (concurrently on object stores) and keep the
    DICOM ones."""
    heads = _heads(fs, [entry.path for entry in page])
    for entry, head in zip(page, heads, strict=True):
        uri = _recordable(to_uri(fs, entry.path))
        if entry.size == 0 or not head:  # S3 refuses a range of an empty object
            skip(uri, "empty file (0 bytes)")
            continue
        if isinstance(head, BaseException):
            # Unreadable even after retries: not known to be anything but an export file.
            # The reader tries again and records a failed row, so the next run retries it.
            yield ScanItem(uri, entry.path, entry.size, entry.etag)
            continue
        if not is_dicom(bytes(head)):
            skip(uri, "not DICOM (no 'DICM' marker and no ACR-NEMA element at the start)")
            continue
        if entry.size > MAX_SOURCE_BYTES:
            skip(uri, f"larger than {MAX_SOURCE_BYTES >> 20} MiB: not a single-frame image")
            continue
        digest = None
        if entry.etag is None and hash_content:
            # Unreadable now: left to the reader, which hashes what it reads or records why not.
            with contextlib.suppress(OSError):
                digest = _sha256(fs, entry.path)
        yield ScanItem(uri, entry.path, entry.size, entry.etag, digest)


def _heads(fs: AbstractFileSystem, paths: list[str]) -> list[bytes | BaseException]:
    """The first bytes of every file of ``paths``, fetched together; reads that fail in
    passing (throttling, a dropped connection) are fetched again with backoff."""
    heads: list[bytes | BaseException] = [OSError("not read")] * len(paths)
    todo = list(range(len(paths)))
    for attempt in range(LIST_ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
        wanted = [paths[index] for index in todo]
        fetched = fs.cat_ranges(
            wanted, [0] * len(wanted), [SNIFF_BYTES] * len(wanted), on_error="return"
        )
        for index, head in zip(todo, fetched, strict=True):
            heads[index] = head
        todo = [index for index in todo if _retryable(heads[index])]
        if not todo:
            break
    return heads


def _retryable(head: bytes | BaseException) -> bool:
    return isinstance(head, BaseException) and is_transient(head)


def _recordable(uri: str) -> str:
    """``uri`` as valid UTF-8 text: a local name in another encoding (a Latin-1 folder of an
    old PACS) reaches Python with surrogate escapes, which Parquet and JSON cannot store;
    such bytes are written as ``\\xNN`` instead. The file is still read by its real path."""
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return uri


def _sha256(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
