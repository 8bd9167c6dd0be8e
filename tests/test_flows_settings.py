"""Migration settings (flags > environment > config file > defaults) and the CLI's surface."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from flows.migrate_command import flag_overrides
from flows.settings import MigrationSettings, settings_reference


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "radiarc.yaml"
    path.write_text(
        "codec:\n  tile_size: 256\n  rate: {min_ssim: 0.97}\n"
        "ray: {workers: 3, batch_images: 6}\n"
        "source_options: {endpoint_url: 'http://s3.local'}\n"
    )
    return path


def test_defaults_are_a_cheap_local_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings = MigrationSettings()
    assert settings.codec.rate.control().describe() == "iterations=4"
    assert settings.codec.archive_settings().tile_size == 512
    assert (settings.ray.workers, settings.ray.cpus_per_worker) == (2, 0.5)
    assert settings.ray.max_in_flight() == 4 and settings.ray_address() is None


def test_flags_beat_environment_beats_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADIARC_RAY__WORKERS", "5")
    monkeypatch.setenv("RADIARC_CODEC__TILE_SIZE", "128")
    from_file = MigrationSettings.load(config_file)
    assert from_file.ray.workers == 5 and from_file.codec.tile_size == 128  # env over file
    assert from_file.ray.batch_images == 6 and from_file.codec.rate.min_ssim == 0.97
    assert from_file.source_options == {"endpoint_url": "http://s3.local"}
    flagged = MigrationSettings.load(config_file, flag_overrides(workers=7, bpp=0.3))
    assert flagged.ray.workers == 7
    # One rate setting: a flag's --bpp replaces the file's min_ssim instead of clashing.
    assert (flagged.codec.rate.bpp, flagged.codec.rate.min_ssim) == (0.3, None)
    adaptive = MigrationSettings.load(config_file, flag_overrides(bpp=0.125, adaptive=True))
    assert adaptive.codec.rate.control().describe() == "bpp<=0.125 adaptive"
    assert adaptive.codec.archive_settings().codec_config()["adaptive"] is True
    assert "adaptive" not in flagged.codec.archive_settings().codec_config()
    half = MigrationSettings.load(config_file, flag_overrides(bpp=0.125, half_res=True))
    assert half.codec.rate.control().describe() == "bpp<=0.125 half-res"
    assert half.codec.archive_settings().codec_config()["half_res"] is True
    assert half.codec.archive_settings().serializer(12).settings.rate.half_res
    assert "half_res" not in flagged.codec.archive_settings().codec_config()
    lossless = MigrationSettings.load(config_file, flag_overrides(max_error=0))
    assert lossless.codec.rate.control().describe() == "lossless"
    assert lossless.codec.rate.min_ssim is None  # the flag replaces the file's floor
    assert lossless.codec.archive_settings().codec_config()["max_error"] == 0
    assert lossless.codec.archive_settings().serializer(12).settings.rate.max_error == 0
    assert "max_error" not in flagged.codec.archive_settings().codec_config()
    mixed = MigrationSettings.load(config_file, flag_overrides(bpp=0.5, residual=True))
    assert mixed.codec.rate.control().describe() == "bpp<=0.5 residual"
    assert mixed.codec.archive_settings().codec_config()["residual"] is True
    assert "residual" not in flagged.codec.archive_settings().codec_config()
    refined = MigrationSettings.load(config_file, flag_overrides(refine_steps=8))
    assert refined.codec.archive_settings().codec_config()["refine_steps"] == 8
    assert "refine_steps" not in flagged.codec.archive_settings().codec_config()


def test_config_file_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADIARC_CONFIG", str(config_file))
    assert MigrationSettings().ray.workers == 3
    toml = config_file.with_suffix(".toml")
    toml.write_text("[ray]\nworkers = 9\n")
    assert MigrationSettings.load(toml).ray.workers == 9


@pytest.mark.parametrize(
    "overrides",
    [
        {"ray": {"workers": 0}},
        {"ray": {"gpus_per_worker": -1}},
        {"codec": {"tile_size": 100}},  # not a multiple of 16
        {"codec": {"rate": {"min_ssim": 1.5}}},
        {"codec": {"rate": {"iterations": 2, "bpp": 0.5}}},
        {"codec": {"rate": {"min_ssim": 0.97, "adaptive": True}}},  # block stops need a bpp
        {"ray": {"device": "tpu"}},
        {"ray": {"wokers": 2}},  # a typo is an error, not silently ignored
        {"manifest": {"flush_rows": 0}},
    ],
)
def test_out_of_range_or_unknown_settings_are_refused(overrides: dict) -> None:
    with pytest.raises(ValidationError):
        MigrationSettings.load(None, overrides)


def test_fractional_resources_and_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = MigrationSettings.load(
        None, {"ray": {"cpus_per_worker": 0.25, "gpus_per_worker": 0.5}}
    )
    assert (settings.ray.cpus_per_worker, settings.ray.gpus_per_worker) == (0.25, 0.5)
    monkeypatch.setenv("RAY_ADDRESS", "ray-head:6379")
    assert settings.ray_address() == "ray-head:6379"


def test_every_setting_is_described() -> None:
    reference = settings_reference()
    names = {name for name, *_ in reference}
    assert {"RADIARC_RAY__WORKERS", "RADIARC_CODEC__RATE__MIN_SSIM", "RADIARC_RUN_ID"} <= names
    assert all(description for *_, description in reference)


def test_migrate_and_demo_help() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["migrate", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in (
        "--min-ssim",
        "--iterations",
        "--bpp",
        "--adaptive",
        "--half-res",
        "--max-error",
        "--residual",
        "--refine-steps",
        "--workers",
        "--gpus-per-worker",
        "--config",
        "--endpoint-url",
    ):
        assert flag in result.output
    assert "source" in result.output.lower() and "archive" in result.output.lower()
    result = runner.invoke(app, ["demo", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "plain zarr" in result.output


def test_conflicting_or_invalid_flags_stop_before_any_work(tmp_path: Path) -> None:
    runner = CliRunner()
    both = runner.invoke(
        app, ["migrate", "src", str(tmp_path / "a"), "--iterations", "2", "--bpp", "0.5"]
    )
    assert both.exit_code == 2 and "choose one of" in both.output
    alone = runner.invoke(app, ["migrate", "src", str(tmp_path / "a"), "--adaptive"])
    assert alone.exit_code == 2 and "--adaptive needs --bpp" in alone.output
    half = runner.invoke(app, ["migrate", "src", str(tmp_path / "a"), "--half-res"])
    assert half.exit_code == 2 and "--half-res needs --bpp" in half.output
    bound = ["migrate", "src", str(tmp_path / "a"), "--max-error", "0", "--bpp", "1"]
    alone = runner.invoke(app, ["migrate", "src", str(tmp_path / "a"), "--residual"])
    assert alone.exit_code == 2 and "--residual needs --bpp" in alone.output
    clash = runner.invoke(app, bound, terminal_width=200)
    assert clash.exit_code == 2 and "(got --bpp, --max-error)" in clash.output
    bad = runner.invoke(app, ["migrate", "src", str(tmp_path / "a"), "--workers", "0"])
    assert bad.exit_code == 2 and "invalid settings" in bad.output
    assert not (tmp_path / "a").exists()
