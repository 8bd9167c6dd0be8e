"""The migration flow end to end: a PACS export in, a verified archive, manifests and a report
out, locally and on S3 (moto's server on 127.0.0.1), with a local Ray and Prefect's test
harness. A second run over a finished export encodes nothing and records nothing.

Images are small crops of the real test X-rays and the real ACR-NEMA chest file, coded with 2
iterations on 32- or 64-pixel tiles: the pipeline is under test, not the codec's quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import s3fs
import zarr
from storage_helpers import small_pngs, write_local_export

from flows.migrate import ARTIFACT_KEY, RunSummary, migrate_flow
from storage.manifest import MANIFEST_DIR, read_manifest
from storage.synth import write_export

pytestmark = pytest.mark.usefixtures("prefect_api", "local_ray")

#: Cheap settings: 2 iterations on small tiles, 2 encoders of half a CPU, 2 images per call.
CHEAP: dict[str, Any] = {
    "codec": {"tile_size": 64, "rate": {"iterations": 2}},
    "ray": {"workers": 2, "cpus_per_worker": 0.5, "batch_images": 2, "tile_batch": 8},
    "manifest": {"flush_rows": 2},
    "report": {"worst_images": 2, "crop": 48},
}


def settings(**extra: Any) -> dict[str, Any]:
    merged = json.loads(json.dumps(CHEAP))
    for key, value in extra.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def archived_paths(archive: str, options: dict[str, Any] | None = None) -> list[str]:
    rows = read_manifest(archive, options).to_pylist()
    return [
        f"{r['study_instance_uid']}/{r['series_instance_uid']}/{r['sop_instance_uid']}"
        for r in rows
        if r["status"] == "archived"
    ]


def test_local_export_to_local_archive_then_a_second_run_does_nothing(
    tmp_path: Path, guarded_export: Any
) -> None:
    export, archive = tmp_path / "export", tmp_path / "archive"
    write_local_export(export, small_pngs(3, side=96))  # 3 synthetic + real MONO1 + 3 not DICOM
    guarded_export(export)  # unchanged by both runs (checked at teardown)

    first: RunSummary = migrate_flow(str(export), str(archive), settings=settings())

    assert (first.archived, first.failed, first.skipped, first.not_dicom) == (4, 0, 0, 3)
    assert first.files_listed == 7 and first.already_done == 0
    assert first.tiles > 4 and first.stored_bytes > 0 and len(first.workers) == 2
    table = read_manifest(str(archive))
    assert table.num_rows == 4 and set(table["run_id"].to_pylist()) == {first.run_id}
    assert set(table["rate"].to_pylist()) == {"iterations=2"}
    assert all(seconds > 0 for seconds in table["verify_seconds"].to_pylist())
    for path in archived_paths(str(archive)):
        array = zarr.open_array(str(archive / path), mode="r")  # plain zarr, entry-point codec
        assert array.attrs["radiarc"]["complete"] is True
        assert array.attrs["radiarc"]["quality"]["iterations_max"] == 2
        assert array[...].shape == (
            array.attrs["radiarc"]["pixels"]["rows"],
            array.attrs["radiarc"]["pixels"]["columns"],
        )

    report_dir = archive / "reports" / first.run_id
    report = (report_dir / "report.md").read_text()
    assert first.report_uri and first.report_uri.endswith(f"{first.run_id}/report.md")
    assert {"ratio.png", "quality.png", "worst-1.png", "worst-2.png"} <= {
        p.name for p in report_dir.iterdir()
    }
    for heading in ("## Totals", "## Distributions", "## Worst images", "## Failures"):
        assert heading in report
    assert "| archived | 4 |" in report and "not DICOM" in report

    from prefect.artifacts import Artifact

    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None and first.run_id in str(artifact.data)

    parts = sorted((archive / MANIFEST_DIR).rglob("*.parquet"))
    second = migrate_flow(str(export), str(archive), settings=settings())

    assert (second.archived, second.failed, second.skipped) == (0, 0, 0)
    assert second.already_done == 4 and second.tiles == 0
    assert second.workers == []  # no encoder was even started
    assert sorted((archive / MANIFEST_DIR).rglob("*.parquet")) == parts  # no rows added


def test_s3_export_to_s3_archive(
    s3_bucket: tuple[str, dict[str, str]], guarded_export: Any
) -> None:
    bucket, options = s3_bucket
    export, archive = f"s3://{bucket}/pacs/2024", f"s3://{bucket}/archive"
    write_export(export, small_pngs(4, side=80), count=5, per_study=2, storage_options=options)
    guarded_export(export, options)
    sharded = settings(codec={"shard_tiles": 2}, source_options=options, archive_options=options)

    summary = migrate_flow(export, archive, settings=sharded)

    assert (summary.archived, summary.failed, summary.skipped) == (5, 0, 0)
    assert summary.files_listed == 5
    table = read_manifest(archive, options)
    assert all(uri.startswith(f"s3://{bucket}/pacs/") for uri in table["source_uri"].to_pylist())
    assert all(key.startswith("etag:") for key in table["source_checksum"].to_pylist())
    fs = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], skip_instance_cache=True)
    path = archived_paths(archive, options)[0]
    store = zarr.storage.FsspecStore.from_url(f"{archive}/{path}", storage_options=options)
    array = zarr.open_array(store, mode="r")
    assert array.attrs["radiarc"]["complete"] is True and array[...].shape == (80, 80)
    assert array.metadata.to_dict()["codecs"][0]["name"] == "sharding_indexed"
    assert fs.exists(f"{bucket}/archive/reports/{summary.run_id}/report.md")

    again = migrate_flow(export, archive, settings=sharded)
    assert again.archived == 0 and again.already_done == 5 and again.tiles == 0
    # Another codec configuration is another archive version: everything is coded again.
    plain = settings(source_options=options, archive_options=options)
    assert migrate_flow(export, archive, settings=plain).archived == 5


def test_quality_floor_failures_are_recorded_not_accepted(
    tmp_path: Path, guarded_export: Any
) -> None:
    export, archive = tmp_path / "export", tmp_path / "archive"
    write_export(str(export), small_pngs(2, side=64))
    guarded_export(export)
    unreachable = settings(codec={"tile_size": 32, "rate": {"min_ssim": 0.9999}})

    summary = migrate_flow(str(export), str(archive), settings=unreachable)

    assert summary.failed == 2 and summary.archived == 0
    table = read_manifest(str(archive)).to_pylist()
    for row in table:
        assert row["status"] == "failed"
        assert row["reason"].startswith("below quality floor:") and "ssim>=0.9999" in row["reason"]
        assert row["ssim"] is not None  # measured on the stored bytes, reported
        path = f"{row['study_instance_uid']}/{row['series_instance_uid']}/{row['sop_instance_uid']}"
        attrs = zarr.open_array(str(archive / path), mode="r").attrs["radiarc"]
        assert attrs["complete"] is False and "floor_shortfall" in attrs["quality"]
    report = (archive / "reports" / summary.run_id / "report.md").read_text()
    assert "below quality floor" in report

    reachable = settings(codec={"tile_size": 32, "rate": {"min_psnr": 5.0}})
    retried = migrate_flow(str(export), str(archive), settings=reachable)
    assert retried.archived == 2 and retried.failed == 0


def test_the_scan_is_never_ahead_of_finished_work_by_more_than_in_flight() -> None:
    """Memory stays flat on any export size: batches are taken from the (lazy) scan only as
    earlier ones finish, so at most ``in_flight`` are outstanding."""
    import ray

    from flows.actors import BatchResult
    from flows.migrate import _dispatch

    class Encoder:
        class process:  # the shape of a Ray actor method
            @staticmethod
            def remote(batch: list[int]) -> Any:
                return ray.put(BatchResult([], {}, len(batch), 0.0, "fake"))

    class Pool:
        def __init__(self) -> None:
            self.actors = [Encoder(), Encoder()]
            self.generations = [0, 0]

        def start(self) -> list[Encoder]:
            return self.actors

    taken = 0

    def batches() -> Any:
        nonlocal taken
        for index in range(2000):
            taken += 1
            yield [index]

    finished = 0
    for _, result in _dispatch(Pool(), batches(), in_flight=4):  # type: ignore[arg-type]
        finished += 1
        assert isinstance(result, BatchResult) and taken - finished <= 4
    assert finished == 2000
