"""Storage credentials come only from the AWS chain or from settings (environment, config
file), and are never logged or stored: not in Python or Prefect logs, Prefect flow-run
parameters or artifacts, Ray worker logs, reports, manifests, the run summary or the
settings' repr. Where they would be stored (Prefect parameters, command-line flags) they are
refused, by key and without echoing the value.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import ray
import s3fs
from storage_helpers import small_pngs
from typer.testing import CliRunner

from flows.cli import app
from flows.migrate import ARTIFACT_KEY, migrate_flow
from flows.settings import CredentialsInParametersError, MigrationSettings, refuse_credentials
from storage.faults import S3FaultProxy
from storage.synth import write_export

ACCESS_KEY = "AKIARADIARCTESTKEY01"
SECRET = "rAdIaRc-test-secret/9f8e7d6c5b4a"


def texts_under(folder: Path) -> list[str]:
    return [p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()]


@pytest.mark.usefixtures("local_ray")
def test_credentials_from_settings_are_used_and_never_written(
    s3_endpoint: str,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    bucket = "secrets"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(bucket)
    write_export(
        f"s3://{bucket}/export",
        small_pngs(3, side=64),
        storage_options={"endpoint_url": s3_endpoint},
    )
    proxy = S3FaultProxy(s3_endpoint).start()  # no faults: it records which keys signed
    options = {"endpoint_url": proxy.url, "key": ACCESS_KEY, "secret": SECRET}
    monkeypatch.setenv("RADIARC_SOURCE_OPTIONS", json.dumps(options))
    monkeypatch.setenv("RADIARC_ARCHIVE_OPTIONS", json.dumps(options))
    caplog.set_level(logging.INFO)  # the operating level; Radiarc's own loggers at DEBUG
    for name in ("flows", "storage", "codec"):
        caplog.set_level(logging.DEBUG, logger=name)
    archive = f"s3://{bucket}/archive"
    settings = {
        "codec": {"tile_size": 32, "rate": {"iterations": 1}},
        "ray": {"workers": 1},
        "report": {"worst_images": 1, "crop": 32},
    }
    try:
        summary = migrate_flow(f"s3://{bucket}/export", archive, settings=settings)
    finally:
        proxy.stop()

    assert summary.archived == 3
    assert proxy.access_key_ids == {ACCESS_KEY}  # every request was signed with them
    written = tmp_path / "archive-copy"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).get(
        f"{bucket}/archive", str(written), recursive=True
    )
    outputs = [repr(summary), caplog.text, repr(MigrationSettings.load())]
    outputs += texts_under(written)  # arrays' attributes, manifests, report
    outputs += texts_under(Path(ray._private.worker._global_node.get_logs_dir_path()))
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None
    outputs.append(str(artifact.data))
    with get_client(sync_client=True) as client:
        outputs += [log.message for log in client.read_logs(limit=200)]
        outputs += [json.dumps(run.parameters, default=str) for run in client.read_flow_runs()]
    assert len(outputs) > 10
    for text in outputs:
        assert SECRET not in text and ACCESS_KEY not in text, text[:300]


def test_credentials_in_flow_parameters_are_refused_without_echo() -> None:
    with pytest.raises(CredentialsInParametersError) as refused:
        refuse_credentials(
            {"archive_options": {"client_kwargs": {"aws_secret_access_key": SECRET}}}, "here"
        )
    assert "archive_options.client_kwargs.aws_secret_access_key" in str(refused.value)
    assert SECRET not in str(refused.value)
    refuse_credentials({"source_options": {"endpoint_url": "http://127.0.0.1:9"}}, "here")


def test_cli_refuses_credential_flags_and_hides_invalid_values(tmp_path: Path) -> None:
    runner = CliRunner()
    flags = ["migrate", str(tmp_path / "export"), str(tmp_path / "archive")]
    refused = runner.invoke(app, [*flags, "-o", f"secret={SECRET}"])
    assert refused.exit_code == 2 and "source_options.secret" in refused.output
    assert SECRET not in refused.output

    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"source_options": f"key={ACCESS_KEY} secret={SECRET}"}))
    invalid = runner.invoke(app, [*flags, "--config", str(config)])
    assert invalid.exit_code == 2 and "source_options" in invalid.output
    assert SECRET not in invalid.output and ACCESS_KEY not in invalid.output
    assert "***" in repr(MigrationSettings.load(None, {"source_options": {"secret": "x"}}))
