"""Read one DICOM file of an export, from any fsspec URI, into what the archive needs.

The whole object is fetched in one read (radiographs are a few MB; one GET is far cheaper
than pydicom's many small seeks over S3), hashed, and parsed by :func:`storage.dicom.read_dicom`.
Sources are read-only: nothing here writes to the export.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from storage.dicom import DicomError, DicomImage, read_dicom
from storage.fsutil import StorageOptions, open_fs, to_uri
from storage.scan import ScanItem

__all__ = ["SourceImage", "SourceReadError", "read_source", "read_uri"]


class SourceReadError(Exception):
    """A source file that could not be fetched (network, throttling, permissions, vanished):
    the file itself may be fine, so a later run tries it again (a ``failed`` row, not
    ``skipped``). The message names the error type, never the path: paths may hold PHI."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(reason)
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class SourceImage:
    """A decoded source file with the facts about its bytes that the archive records."""

    uri: str
    dicom: DicomImage
    n_bytes: int
    sha256: str
    etag: str | None = None

    @property
    def checksum(self) -> str:
        """``etag:...`` when the store gave one (what a resumed scan sees), else ``sha256:...``."""
        return f"etag:{self.etag}" if self.etag else f"sha256:{self.sha256}"


def read_source(fs: AbstractFileSystem, item: ScanItem) -> SourceImage:
    """Fetch and decode ``item``. :class:`SourceReadError` when the bytes cannot be fetched
    (worth retrying), :class:`DicomError` when they cannot be archived."""
    try:
        data = fs.cat_file(item.path)
    except Exception as error:  # s3fs, botocore and aiohttp fail with unrelated types
        raise SourceReadError(item.uri, f"cannot read source ({type(error).__name__})") from error
    digest = hashlib.sha256(data).hexdigest()
    if item.sha256 is not None and item.sha256 != digest:
        raise DicomError(item.uri, "content changed since it was scanned (SHA-256 differs)")
    dicom = read_dicom(data, name=item.uri)
    return SourceImage(item.uri, dicom, len(data), digest, item.etag)


def read_uri(uri: str, storage_options: StorageOptions | None = None) -> SourceImage:
    """Fetch and decode the single file at ``uri``."""
    fs, path = open_fs(uri, storage_options)
    try:
        size = int(fs.size(path) or 0)
    except Exception as error:
        raise SourceReadError(uri, f"cannot read source ({type(error).__name__})") from error
    return read_source(fs, ScanItem(to_uri(fs, path), path, size))
