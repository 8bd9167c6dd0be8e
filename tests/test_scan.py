"""Scanning a PACS export (storage.scan) and reading its files (storage.source), local and S3."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from storage_helpers import MONO1, REAL_DICOMS, small_pngs, write_local_export

import storage.scan as scan_module
from storage.dicom import DicomError
from storage.fsutil import open_fs
from storage.scan import ScanItem, scan
from storage.source import SourceReadError, read_source, read_uri
from storage.synth import write_export

DICOM_NAMES = {"IMG0.dcm", "IMG1", "IMG2.dcm", "chest"}


def names(items: list[ScanItem]) -> set[str]:
    return {item.uri.rsplit("/", 1)[-1] for item in items}


@pytest.fixture
def export(tmp_path: Path) -> Path:
    write_local_export(tmp_path / "export")
    return tmp_path / "export"


def upload(local: Path, bucket: str, options: dict[str, str], prefix: str = "export") -> str:
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(
                f"{bucket}/{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes()
            )
    return f"s3://{bucket}/{prefix}"


def test_local_scan_finds_dicom_by_content_not_name(export: Path) -> None:
    skipped: list[tuple[str, str]] = []
    items = list(scan(str(export), on_skip=lambda uri, reason: skipped.append((uri, reason))))
    # .dcm-less files, a preamble-less file and the real ACR-NEMA file are found; a PNG
    # named .dcm, a text file and an empty file are not, each with a reason.
    assert names(items) == DICOM_NAMES
    reasons = {uri.rsplit("/", 1)[-1]: reason for uri, reason in skipped}
    assert set(reasons) == {"notes.txt", "fake.dcm", "empty.dcm"}
    assert "not DICOM" in reasons["fake.dcm"] and "empty" in reasons["empty.dcm"]
    for item in items:
        data = Path(item.path).read_bytes()
        assert item.size == len(data)
        assert item.sha256 == hashlib.sha256(data).hexdigest()
        assert item.checksum == f"sha256:{item.sha256}" and item.etag is None
        assert item.uri == item.path  # local files are named by plain paths


def test_file_uri_single_file_and_no_hashing(export: Path) -> None:
    via_uri = list(scan(f"file://{export}", hash_content=False))
    assert names(via_uri) == DICOM_NAMES
    assert all(item.sha256 is None and item.checksum is None for item in via_uri)
    (single,) = scan(str(MONO1))
    assert single.path == str(MONO1) and single.size == MONO1.stat().st_size
    assert list(scan(str(export / "notes.txt"))) == []


def test_scan_is_streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first item comes after one page of listing, not after listing everything."""
    write_export(str(tmp_path), small_pngs(2, side=32), count=40)
    listed: list[str] = []
    real = scan_module._list_files

    def counting(fs: object, root: str) -> Iterator[scan_module._Listed]:
        for entry in real(fs, root):  # type: ignore[arg-type]
            listed.append(entry.path)
            yield entry

    monkeypatch.setattr(scan_module, "_list_files", counting)
    monkeypatch.setattr(scan_module, "PAGE_SIZE", 4)
    iterator = scan(str(tmp_path))
    next(iterator)
    assert len(listed) == 4  # one page of the 40 files
    assert len(list(iterator)) == 39 and len(listed) == 40


def test_s3_scan_paginates_and_uses_etags(
    export: Path, s3_bucket: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, options = s3_bucket
    uri = upload(export, bucket, options)
    calls: list[dict[str, object]] = []
    real_call = s3fs.S3FileSystem.call_s3

    def spy(self: s3fs.S3FileSystem, method: str, *args: object, **kwargs: object) -> object:
        if method == "list_objects_v2":
            calls.append(kwargs)
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", spy)
    monkeypatch.setattr(scan_module, "PAGE_SIZE", 3)
    skipped: list[str] = []
    items = list(scan(uri, options, on_skip=lambda found, _reason: skipped.append(found)))
    assert names(items) == DICOM_NAMES
    assert len(calls) >= 3 and all(call["MaxKeys"] == 3 for call in calls)  # 7 keys, 3 a page
    assert "ContinuationToken" in calls[-1]
    assert {found.rsplit("/", 1)[-1] for found in skipped} == {"notes.txt", "fake.dcm", "empty.dcm"}
    local = {i.uri.rsplit("/", 1)[-1]: i for i in scan(str(export))}
    for item in items:
        assert item.uri.startswith(f"s3://{bucket}/export/")
        assert item.etag and item.checksum == f"etag:{item.etag}" and item.sha256 is None
        assert item.size == local[item.uri.rsplit("/", 1)[-1]].size


def test_s3_single_object_and_missing_prefix(
    export: Path, s3_bucket: tuple[str, dict[str, str]]
) -> None:
    bucket, options = s3_bucket
    uri = upload(export, bucket, options)
    (single,) = scan(f"{uri}/legacy/chest", options)
    assert single.size == MONO1.stat().st_size
    assert list(scan(f"s3://{bucket}/nothing-here", options)) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_source_decodes_and_checks_content(
    where: str, export: Path, request: pytest.FixtureRequest
) -> None:
    options: dict[str, str] = {}
    uri = str(export)
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        uri = upload(export, bucket, options)
    fs, _ = open_fs(uri, options)
    items = {item.uri.rsplit("/", 1)[-1]: item for item in scan(uri, options)}
    source = read_source(fs, items["chest"])
    assert source.dicom.image.pixels.shape == (440, 440) and source.dicom.image.bits_stored == 10
    assert source.sha256 == hashlib.sha256(MONO1.read_bytes()).hexdigest()
    assert source.checksum == items["chest"].checksum
    assert "PatientName" in source.dicom.header  # the header is whole; it stays in the archive
    if where == "local":
        changed = items["IMG0.dcm"]
        Path(changed.path).write_bytes(Path(changed.path).read_bytes() + b"\0\0")
        with pytest.raises(DicomError, match="content changed"):
            read_source(fs, changed)


def test_read_uri_reports_unarchivable_inputs(tmp_path: Path) -> None:
    for path in REAL_DICOMS:
        assert read_uri(str(path)).dicom.image.pixels.ndim == 2
    with pytest.raises(SourceReadError, match="cannot read source"):
        read_uri(str(tmp_path / "missing.dcm"))
    text = tmp_path / "x.dcm"
    text.write_text("hello " * 50)
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_uri(str(text))
