"""The storage benchmark runs end to end on a tiny export (the real numbers: docs/storage.md)."""

from __future__ import annotations

import pytest

from storage import bench


def test_bench_runs_on_a_tiny_export(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--files", "12", "--side", "32", "--rows", "6000", "--threads", "2"])
    output = capsys.readouterr().out
    for text in (
        "| local disk | scan |",
        "| S3 (moto) | read + decode, 2 threads |",
        "done_instances",
    ):
        assert text in output
    rows = list(bench.synthetic_rows(50, "r"))
    assert {row.status for row in rows} <= {"archived", "skipped", "failed"}
