"""Where things are in an archive: the zarr v3 group, instance paths, finding an instance.

Layout (docs/storage.md)::

    ARCHIVE/zarr.json                                 root group, attributes {"radiarc": ...}
    ARCHIVE/<study uid>/<series uid>/<sop uid>/       one array per instance
    ARCHIVE/manifests/                                Parquet manifests (storage.manifest)

UIDs become path components only after :func:`storage.uids.validate_uid`.
"""

from __future__ import annotations

import pyarrow.compute as pc
import zarr
import zarr.storage
from fsspec import AbstractFileSystem
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from zarr.abc.store import Store

from storage.fsutil import StorageOptions, is_local, join, open_fs
from storage.manifest import MANIFEST_DIR, read_manifest
from storage.uids import validate_uid

__all__ = ["LAYOUT_VERSION", "Archive", "header_text", "instance_path"]

LAYOUT_VERSION = 1
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class Archive:
    """An archive at ``uri``; created (root group and layout marker) unless ``create=False``."""

    def __init__(
        self, uri: str, storage_options: StorageOptions | None = None, *, create: bool = True
    ) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.fs: AbstractFileSystem
        self.fs, self.root = open_fs(self.uri, self.storage_options)
        self.store: Store
        if is_local(self.fs):
            self.store = zarr.storage.LocalStore(self.root)
        else:
            self.store = zarr.storage.FsspecStore.from_url(
                self.uri, storage_options=self.storage_options
            )
        if create:
            self._ensure_layout()
        elif not self.fs.exists(join(self.root, "zarr.json")):
            raise FileNotFoundError(f"no Radiarc archive at {self.uri} (no zarr.json)")

    def _ensure_layout(self) -> None:
        if not self.fs.exists(join(self.root, "zarr.json")):
            zarr.create_group(
                self.store, attributes={"radiarc": {"layout_version": LAYOUT_VERSION}}
            )
        if not self.fs.exists(join(self.root, MANIFEST_DIR, "zarr.json")):
            # A group marker, so that zarr sees a known node, not an unknown folder, here.
            zarr.create_group(
                self.store,
                path=MANIFEST_DIR,
                attributes={"radiarc": {"manifests": "Parquet, one row per image per run"}},
            )

    def group(self) -> zarr.Group:
        return zarr.open_group(self.store, mode="r")

    def open_array(self, path: str) -> zarr.Array:
        return zarr.open_array(self.store, path=path, mode="r")

    def locate(self, uid_or_path: str) -> str:
        """The array path of an instance, given its SOP Instance UID or ``study/series/sop``.

        Looks in the manifests first (one filtered read), then walks the study and series
        groups; raises ``KeyError`` when the instance is not archived here.
        """
        parts = uid_or_path.strip("/").split("/")
        if len(parts) == 3:
            path = "/".join(validate_uid(part, "UID", lenient=True) for part in parts)
            if self.fs.exists(join(self.root, path, "zarr.json")):
                return path
            raise KeyError(f"no archived instance at {path}")
        sop = validate_uid(uid_or_path, "SOP Instance UID", lenient=True)
        table = read_manifest(
            self.uri,
            self.storage_options,
            columns=["study_instance_uid", "series_instance_uid", "timestamp"],
            filter=(pc.field("sop_instance_uid") == sop) & (pc.field("status") == "archived"),
        )
        for row in reversed(table.sort_by("timestamp").to_pylist()):
            path = f"{row['study_instance_uid']}/{row['series_instance_uid']}/{sop}"
            if self.fs.exists(join(self.root, path, "zarr.json")):
                return path
        for study in self._children(self.root):
            for series in self._children(join(self.root, study)):
                path = f"{study}/{series}/{sop}"
                if self.fs.exists(join(self.root, path, "zarr.json")):
                    return path
        raise KeyError(f"SOP Instance UID {sop} is not in the archive")

    def _children(self, directory: str) -> list[str]:
        names = []
        for entry in self.fs.ls(directory, detail=True):
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" and name != MANIFEST_DIR:
                names.append(name)
        return sorted(names)


def instance_path(header: Dataset, lenient: bool = False) -> tuple[str, str, str]:
    """Validated (study, series, sop) UIDs of ``header``; :class:`UIDError` otherwise."""
    study, series, sop = (
        validate_uid(header_text(header, keyword), keyword, lenient=lenient)
        for keyword in _UID_KEYWORDS
    )
    return study, series, sop


def header_text(header: Dataset, keyword: str) -> str:
    """A string attribute's value as text, read without pydicom's validation (which would
    warn, quoting the value, for malformed UIDs) and without raising. Raw bytes are decoded
    as UTF-8 when valid, else Latin-1 (IDs and code strings are ASCII in practice)."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in header:
        return ""
    try:
        value = header.get_item(tag).value
    except Exception:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("latin-1")
    elif isinstance(value, list | tuple):
        value = "\\".join(str(item) for item in value)
    return str(value if value is not None else "").strip("\x00 ")
