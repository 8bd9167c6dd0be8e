"""Archive integrity: stored checksums (storage.chunks), export's check and ``radiarc verify``.

Real archives of small synthetic DICOMs (96x96, 64-pixel tiles, 2 iterations; one sharded),
damaged on disk or on moto's S3 the ways storage really fails: a flipped byte, a lost chunk
object, a truncated one, a lost array.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import s3fs
from storage_helpers import CHEAP, PATIENT, small_pngs, synthetic_phi
from typer.testing import CliRunner

from flows.cli import app
from storage.archive import Archive, RunContext, archive_instance
from storage.chunks import chunk_objects, chunks_sha256
from storage.dicom import read_dicom
from storage.export import ExportError, export_dicom
from storage.fsutil import join
from storage.manifest import ManifestRow, ManifestWriter, read_manifest
from storage.source import SourceImage
from storage.synth import dicom_bytes, synthetic_dicom
from storage.verify import verify_archive

pytestmark = pytest.mark.usefixtures("one_thread_torch")
CONTEXT = RunContext("verify-test", worker="tester")
runner = CliRunner()


def sources(count: int, prefix: str) -> list[SourceImage]:
    out = []
    for index, image in enumerate(small_pngs(count, side=96)):
        dataset = synthetic_dicom(image, f"{prefix}:{index}", patient=PATIENT, study_seed=prefix)
        data = dicom_bytes(dataset)
        out.append(SourceImage(f"mem://{prefix}/{index}", read_dicom(data), len(data), "0" * 64))
    return out


def build(archive: Archive, count: int, prefix: str) -> list[ManifestRow]:
    """``count`` instances archived (the last one sharded) with their manifest rows."""
    rows = []
    for index, source in enumerate(sources(count, prefix)):
        settings = replace(CHEAP, shard_tiles=2) if index == count - 1 else CHEAP
        row = archive_instance(archive, source, settings, CONTEXT)
        assert row.status == "archived", row.reason
        rows.append(row)
    with ManifestWriter(
        archive.uri, CONTEXT.run_id, storage_options=archive.storage_options
    ) as writer:
        for row in rows:
            writer.add(row)
    return rows


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ManifestRow]]:
    directory = tmp_path_factory.mktemp("verify") / "archive"
    return directory, build(Archive(str(directory)), 3, "verify")


@pytest.fixture
def damaged(
    pristine: tuple[Path, list[ManifestRow]], tmp_path: Path
) -> tuple[Path, list[ManifestRow]]:
    """A private copy of the pristine archive, to damage."""
    directory, rows = pristine
    copy = tmp_path / "archive"
    shutil.copytree(directory, copy)
    return copy, rows


def instance_dir(root: Path, row: ManifestRow) -> Path:
    return (
        root
        / str(row.study_instance_uid)
        / str(row.series_instance_uid)
        / str(row.sop_instance_uid)
    )


def chunk_files(root: Path, row: ManifestRow) -> list[Path]:
    return sorted(path for path in (instance_dir(root, row) / "c").rglob("*") if path.is_file())


def verify_cli(archive: str, *options: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", archive, "--format", "json", *options])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def problems_of(report: dict, sop: str | None) -> list[dict]:
    return [problem for problem in report["problems"] if problem["sop_instance_uid"] == sop]


def assert_no_phi(text: str) -> None:
    for value in synthetic_phi():
        assert value not in text


def test_checksums_are_recorded_at_archive_time(pristine: tuple[Path, list[ManifestRow]]) -> None:
    directory, rows = pristine
    archive = Archive(str(directory), create=False)
    table = read_manifest(archive.uri).to_pylist()
    for row in rows:
        path = f"{row.study_instance_uid}/{row.series_instance_uid}/{row.sop_instance_uid}"
        array = archive.open_array(path)
        stored = array.attrs["radiarc"]["stored"]
        objects = chunk_objects(archive.fs, join(archive.root, path), array.metadata.to_dict())
        assert stored["algorithm"] == "sha256" and stored["sha256"] == chunks_sha256(objects)
        assert stored["objects"] == len(objects) and stored["bytes"] == row.archived_bytes
        (manifest,) = [item for item in table if item["sop_instance_uid"] == row.sop_instance_uid]
        assert manifest["stored_sha256"] == stored["sha256"] == row.stored_sha256
        assert manifest["decoded_sha256"] == stored["decoded_sha256"] == row.decoded_sha256
        assert manifest["schema_version"] == 2


def test_clean_archive_verifies(pristine: tuple[Path, list[ManifestRow]]) -> None:
    directory, _ = pristine
    code, report = verify_cli(str(directory), "--all")
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["checked"] == report["instances"] == 3 and report["orphans_checked"]
    code, sampled = verify_cli(str(directory), "--sample", "2", "--seed", "7")
    assert code == 0 and sampled["checked"] == 2 and sampled["sampled"] and sampled["seed"] == 7
    again = verify_archive(str(directory), sample=2, seed=7)
    assert again.sample_uids == sampled["sample_uids"] and not again.failed
    table = runner.invoke(app, ["verify", str(directory), "--sample", "2", "--seed", "7"])
    assert table.exit_code == 0 and "OK: checked 2 of 3" in table.output
    assert "--seed 7" in table.output


def test_flipped_byte_is_corrupt_and_export_refuses_it(
    damaged: tuple[Path, list[ManifestRow]], tmp_path: Path
) -> None:
    directory, rows = damaged
    for row in (rows[0], rows[-1]):  # a plain chunk, and a shard
        chunk = chunk_files(directory, row)[0]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x40
        chunk.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(directory), "--all"])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and str(rows[0].sop_instance_uid) in result.output
    assert_no_phi(result.output)
    _, report = verify_cli(str(directory), "--all")
    for row in (rows[0], rows[-1]):
        found = {
            problem["check"]: problem["status"]
            for problem in problems_of(report, row.sop_instance_uid)
        }
        assert found["sha256"] == "corrupt" and "corrupt" in found.values()
        assert any(check.startswith("chunk c/") or check == "decode" for check in found)
    assert problems_of(report, rows[1].sop_instance_uid) == []
    assert report["counts"]["ok"] == 1 and report["counts"]["corrupt"] == 2

    out = tmp_path / "out.dcm"
    with pytest.raises(ExportError, match=str(rows[0].sop_instance_uid)) as raised:
        export_dicom(str(directory), str(rows[0].sop_instance_uid), str(out))
    assert "SHA-256" in str(raised.value)
    assert_no_phi(str(raised.value))
    cli = runner.invoke(app, ["export", str(directory), str(rows[0].sop_instance_uid), str(out)])
    assert cli.exit_code == 2 and "do not match" in cli.output
    assert not out.exists() and not list(tmp_path.glob("*.dcm*")) and not list(tmp_path.glob(".*"))
    export_dicom(str(directory), str(rows[1].sop_instance_uid), str(out))  # intact: exported
    assert out.exists()


def test_lost_chunk_is_reported(damaged: tuple[Path, list[ManifestRow]]) -> None:
    directory, rows = damaged
    chunk_files(directory, rows[1])[-1].unlink()
    code, report = verify_cli(str(directory), "--all")
    found = {problem["check"]: problem for problem in problems_of(report, rows[1].sop_instance_uid)}
    assert code == 1 and found["sha256"]["status"] == "corrupt"
    assert found["archived_bytes"]["status"] == "corrupt" and "objects" in found["sha256"]["detail"]
    with pytest.raises(ExportError, match="do not match"):
        export_dicom(str(directory), str(rows[1].sop_instance_uid), str(directory / "x.dcm"))


def test_truncated_chunk_is_reported(damaged: tuple[Path, list[ManifestRow]]) -> None:
    directory, rows = damaged
    chunk = chunk_files(directory, rows[0])[0]
    chunk.write_bytes(chunk.read_bytes()[:-7])
    code, report = verify_cli(str(directory), "--all")
    found = {problem["check"]: problem for problem in problems_of(report, rows[0].sop_instance_uid)}
    assert code == 1 and found["sha256"]["status"] == "corrupt"
    relative = chunk.relative_to(instance_dir(directory, rows[0])).as_posix()
    assert found[f"chunk {relative}"]["status"] == "corrupt"
    assert found["archived_bytes"]["detail"].endswith(f"{rows[0].archived_bytes - 7} are stored")


def test_missing_array_and_orphans(
    pristine: tuple[Path, list[ManifestRow]], damaged: tuple[Path, list[ManifestRow]]
) -> None:
    directory, rows = damaged
    shutil.rmtree(instance_dir(directory, rows[2]))
    # An array archived (complete) but whose manifest row was never written: an orphan.
    archive = Archive(str(directory))
    (extra,) = sources(1, "orphan")
    orphan = archive_instance(archive, extra, CHEAP, CONTEXT)
    code, report = verify_cli(str(directory), "--all")
    assert code == 1
    (missing,) = problems_of(report, rows[2].sop_instance_uid)
    assert missing["status"] == "missing" and missing["check"] == "array"
    (found,) = problems_of(report, orphan.sop_instance_uid)
    assert found["status"] == "orphan"
    assert found["path"].endswith(str(orphan.sop_instance_uid))
    # A sample does not look for orphans; alone they do not fail verification.
    _, sampled = verify_cli(str(directory), "--sample", "1", "--seed", "1")
    assert not sampled["orphans_checked"] and not problems_of(sampled, orphan.sop_instance_uid)
    shutil.copytree(instance_dir(pristine[0], rows[2]), instance_dir(directory, rows[2]))
    code, report = verify_cli(str(directory), "--all")
    assert code == 0 and [p["status"] for p in report["problems"]] == ["orphan"]


def test_unverifiable_legacy_arrays_and_decoded_drift_are_warnings(
    damaged: tuple[Path, list[ManifestRow]], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    directory, rows = damaged
    # rows[0] as archived before checksums: no `stored` attribute, a row without digests.
    metadata_path = instance_dir(directory, rows[0]) / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    del metadata["attributes"]["radiarc"]["stored"]
    metadata_path.write_text(json.dumps(metadata))
    # rows[1]: decoded on "other hardware", pixels a little different from those measured.
    metadata_path = instance_dir(directory, rows[1]) / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"]["radiarc"]["stored"]["decoded_sha256"] = "0" * 64
    metadata_path.write_text(json.dumps(metadata))
    later = RunContext("verify-legacy", worker="tester")
    with ManifestWriter(str(directory), later.run_id) as writer:
        now = datetime.now(UTC)
        writer.add(replace(rows[0], run_id=later.run_id, timestamp=now, stored_sha256=None))
        writer.add(replace(rows[1], run_id=later.run_id, timestamp=now, decoded_sha256="0" * 64))
    code, report = verify_cli(str(directory), "--all")
    assert code == 0 and report["ok"]
    (legacy,) = problems_of(report, rows[0].sop_instance_uid)
    assert legacy["status"] == "warning" and legacy["check"] == "sha256"
    (drift,) = problems_of(report, rows[1].sop_instance_uid)
    assert drift["status"] == "warning" and drift["check"] == "decoded_sha256"
    assert report["counts"] == {**report["counts"], "ok": 1, "warning": 2}
    code, only = verify_cli(str(directory), "--all", "--run", later.run_id)
    assert only["instances"] == 2 and not only["orphans_checked"]

    with caplog.at_level(logging.WARNING, logger="storage.export"):
        export_dicom(str(directory), str(rows[0].sop_instance_uid), str(tmp_path / "old.dcm"))
    assert (tmp_path / "old.dcm").exists()
    assert any("no stored checksum" in record.getMessage() for record in caplog.records)


def test_bad_usage_exits_2(pristine: tuple[Path, list[ManifestRow]], tmp_path: Path) -> None:
    directory, _ = pristine
    for arguments in (
        ["--sample", "0"],
        ["--all", "--sample", "3"],
        ["--format", "csv"],
    ):
        result = runner.invoke(app, ["verify", str(directory), *arguments])
        assert result.exit_code == 2, (arguments, result.output)
    nowhere = runner.invoke(app, ["verify", str(tmp_path / "none")])
    assert nowhere.exit_code == 2 and "no Radiarc archive" in nowhere.output


def test_cli_verify_on_s3(s3_bucket: tuple[str, dict[str, str]]) -> None:
    bucket, options = s3_bucket
    archive = Archive(f"s3://{bucket}/archive", options)
    rows = build(archive, 2, "verify-s3")
    endpoint = ["--endpoint-url", options["endpoint_url"]]
    code, report = verify_cli(archive.uri, "--all", *endpoint)
    assert code == 0 and report["checked"] == 2 and report["problems"] == []

    fs = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], skip_instance_cache=True)
    prefix = f"{bucket}/archive/{rows[0].study_instance_uid}/{rows[0].series_instance_uid}"
    key = sorted(fs.find(f"{prefix}/{rows[0].sop_instance_uid}/c"))[0]
    data = bytearray(fs.cat_file(key))
    data[20] ^= 0x01
    fs.pipe_file(key, bytes(data))
    result = runner.invoke(app, ["verify", archive.uri, "--sample", "5", *endpoint])
    assert result.exit_code == 1 and "corrupt" in result.output
    assert str(rows[0].sop_instance_uid) in result.output
    assert_no_phi(result.output)
