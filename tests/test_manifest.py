"""Parquet manifests (storage.manifest): schema, atomic batched writes, resume queries."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

import storage.fsutil as fsutil
from storage.manifest import (
    COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    ManifestRow,
    ManifestWriter,
    done_instances,
    manifest_dataset,
    read_manifest,
    validate_run_id,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "storage.md"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(
    run: str = "run-1",
    sop: str | None = "1.2.3.1",
    status: str = "archived",
    key: str = "k1",
    minutes: int = 0,
    **values: object,
) -> ManifestRow:
    return ManifestRow(
        run_id=run,
        status=status,
        timestamp=T0 + timedelta(minutes=minutes),
        worker="w",
        sop_instance_uid=sop,
        codec_key=key,
        source_checksum=f"sha256:{sop}",
        reason=None if status == "archived" else "why",
        **values,  # type: ignore[arg-type]
    )


def test_schema_is_stable_snake_case_and_documented() -> None:
    names = [name for name, _, _ in COLUMNS]
    assert names == SCHEMA.names and len(set(names)) == len(names)
    assert all(name.isidentifier() and name == name.lower() for name in names)
    required = {
        "source_uri",
        "study_instance_uid",
        "series_instance_uid",
        "sop_instance_uid",
        "modality",
        "body_part",
        "rows",
        "columns",
        "bits_stored",
        "source_bytes",
        "archived_bytes",
        "ratio",
        "bpp",
        "psnr",
        "ssim",
        "ms_ssim",
        "max_abs_error",
        "iterations",
        "model_id",
        "status",
        "reason",
        "worker",
        "run_id",
        "timestamp",
        "schema_version",
        "patient_key",
        "read_seconds",
        "encode_seconds",
        "total_seconds",
    }
    assert required <= set(names)
    assert not {"patient_name", "patient_id", "patient_birth_date"} & set(names)
    docs = DOCS.read_text()
    for name in names:
        assert f"`{name}`" in docs, f"column {name} is not documented in docs/storage.md"


def test_rows_round_trip_partitioned_by_run(tmp_path: Path) -> None:
    archive = str(tmp_path / "archive")
    with ManifestWriter(archive, "run-1", batch_rows=2) as writer:
        for index in range(5):
            writer.add(row(sop=f"1.2.3.{index}", psnr=40.0 + index, rows=10))
    assert len(writer.parts) == 3  # 2 + 2 + 1
    for part in writer.parts:
        assert Path(part).parent.name == "run_id=run-1" and part.endswith(".parquet")
        assert pq.read_schema(part).equals(SCHEMA)
    table = read_manifest(archive).sort_by("sop_instance_uid")
    assert table.schema.equals(SCHEMA)
    assert table["psnr"].to_pylist() == [40.0, 41.0, 42.0, 43.0, 44.0]
    assert set(table["schema_version"].to_pylist()) == {SCHEMA_VERSION}
    assert table["timestamp"].type == pa.timestamp("us", tz="UTC")
    with ManifestWriter(archive, "run-2") as writer:
        writer.add(row(run="run-2", sop="9.9"))
    assert read_manifest(archive).num_rows == 6
    assert read_manifest(archive, run_id="run-2")["sop_instance_uid"].to_pylist() == ["9.9"]
    assert not list(Path(archive).rglob(".*"))  # no temporaries left behind


def test_unflushed_rows_are_written_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ManifestWriter(str(tmp_path), "r") as writer:
        writer.add(row(run="r"))
        raise RuntimeError("worker crashed")
    assert read_manifest(str(tmp_path)).num_rows == 1


def test_a_crash_mid_write_leaves_no_visible_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ManifestWriter(str(tmp_path), "r") as writer:
        writer.add(row(run="r", sop="1.1"))

    def crash(_source: str, _target: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(fsutil.os, "replace", crash)
    writer = ManifestWriter(str(tmp_path), "r")
    writer.add(row(run="r", sop="1.2"))
    with pytest.raises(OSError, match="power cut"):
        writer.flush()
    monkeypatch.undo()
    # What a crash leaves in the worst case, a half-written temporary, is never read.
    directory = tmp_path / "manifests" / "run_id=r"
    (directory / ".part-x.parquet.1234.tmp").write_bytes(b"PAR1 half a file")
    (directory / "_SUCCESS").write_bytes(b"")
    table = read_manifest(str(tmp_path))
    assert table["sop_instance_uid"].to_pylist() == ["1.1"]


def test_rows_and_run_ids_are_validated() -> None:
    with pytest.raises(ValueError, match="status"):
        row(status="done")
    for bad in ("", "../x", ".hidden", "a/b", "x" * 200, "run id"):
        with pytest.raises(ValueError, match="run id"):
            validate_run_id(bad)
    writer = ManifestWriter("/tmp/unused-archive", "run-a")
    with pytest.raises(ValueError, match="run"):
        writer.add(row(run="run-b"))


def test_older_parts_without_newer_columns_read_as_nulls(tmp_path: Path) -> None:
    old_schema = pa.schema(
        [field for field in SCHEMA if field.name not in {"iterations_min", "ms_ssim"}]
    )
    record = {name: None for name in old_schema.names}
    record.update(run_id="old", status="archived", sop_instance_uid="1.5", schema_version=0)
    directory = tmp_path / "manifests" / "run_id=old"
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([record], schema=old_schema), directory / "part-0.parquet")
    table = read_manifest(str(tmp_path))
    assert table.schema.equals(SCHEMA)
    assert table["ms_ssim"].to_pylist() == [None] and table["schema_version"].to_pylist() == [0]


def test_version_1_parts_read_beside_version_2_with_null_digests(tmp_path: Path) -> None:
    """Schema 2 added the integrity digests; parts written before read as nulls there."""
    v1 = pa.schema([field for field in SCHEMA if not field.name.endswith("_sha256")])
    assert len(v1) == len(SCHEMA) - 2 and SCHEMA_VERSION == 2
    record = {name: None for name in v1.names}
    record.update(run_id="v1", status="archived", sop_instance_uid="1.6", schema_version=1)
    directory = tmp_path / "manifests" / "run_id=v1"
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([record], schema=v1), directory / "part-0.parquet")
    with ManifestWriter(str(tmp_path), "v2") as writer:
        writer.add(row(run="v2", sop="1.7", stored_sha256="ab" * 32, decoded_sha256="cd" * 32))
    table = read_manifest(str(tmp_path)).sort_by("sop_instance_uid")
    assert table["schema_version"].to_pylist() == [1, 2]
    assert table["stored_sha256"].to_pylist() == [None, "ab" * 32]
    assert table["decoded_sha256"].to_pylist() == [None, "cd" * 32]


def test_done_query_resumes_by_latest_attempt_and_configuration(tmp_path: Path) -> None:
    archive = str(tmp_path)
    with ManifestWriter(archive, "run-1") as writer:
        writer.add(row(sop="1.1", key="k1"))
        writer.add(row(sop="1.2", key="k1"))
        writer.add(row(sop="1.3", key="k2"))  # other configuration
        writer.add(row(sop="1.4", key="k1"))
        writer.add(row(sop=None, status="skipped"))  # not DICOM: no instance
    with ManifestWriter(archive, "run-2") as writer:
        writer.add(row(run="run-2", sop="1.2", status="failed", key="k1", minutes=5))
        writer.add(row(run="run-2", sop="1.4", key="k2", minutes=5))  # re-archived, new config
        writer.add(row(run="run-2", sop="1.5", status="failed", key="k1", minutes=5))
        writer.add(row(run="run-2", sop="1.5", key="k1", minutes=6))  # retried and done
    done = done_instances(archive, "k1")
    assert done.sop_instance_uids == {"1.1", "1.5"}
    assert done.source_checksums == {"sha256:1.1", "sha256:1.5"}
    assert "1.1" in done and "sha256:1.5" in done and "1.2" not in done
    assert done_instances(archive, "k2").sop_instance_uids == {"1.3", "1.4"}
    assert done_instances(str(tmp_path / "empty"), "k1").sop_instance_uids == frozenset()


def test_manifests_on_s3_are_single_puts(s3_bucket: tuple[str, dict[str, str]]) -> None:
    bucket, options = s3_bucket
    archive = f"s3://{bucket}/archive"
    with ManifestWriter(archive, "s3-run", storage_options=options, batch_rows=3) as writer:
        for index in range(4):
            writer.add(row(run="s3-run", sop=f"1.{index}"))
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    keys = fs.find(f"{bucket}/archive/manifests")
    assert len(keys) == 2 and all(key.endswith(".parquet") for key in keys)
    assert all("/run_id=s3-run/part-" in key for key in keys)
    assert read_manifest(archive, options).num_rows == 4
    assert done_instances(archive, "k1", options).sop_instance_uids == {f"1.{i}" for i in range(4)}
    assert manifest_dataset(archive, options).count_rows() == 4


def test_write_atomic_replaces_whole_files(tmp_path: Path) -> None:
    fs, _ = fsutil.open_fs(str(tmp_path))
    target = str(tmp_path / "sub" / "file.bin")
    fsutil.write_atomic(fs, target, b"first")
    fsutil.write_atomic(fs, target, b"second")
    assert Path(target).read_bytes() == b"second"
    assert os.listdir(tmp_path / "sub") == ["file.bin"]
