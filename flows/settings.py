"""Migration settings: typed, bounded, described; from flags, environment and a config file.

Precedence, highest first: values given in code or on the command line, environment variables
``RADIARC_<SECTION>__<FIELD>`` (e.g. ``RADIARC_RAY__WORKERS=4``,
``RADIARC_CODEC__RATE__MIN_SSIM=0.97``), a config file (YAML, TOML or JSON with the same
nesting; ``--config FILE`` or ``RADIARC_CONFIG``), then the defaults below. ``RAY_ADDRESS``
(Ray's own variable) also selects a cluster. ``radiarc migrate --help`` and docs/flows.md show
the fields; :func:`settings_reference` lists them all.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from codec.rate import RateControl
from codec.refine import MAX_STEPS
from codec.weights import DEFAULT_MODEL_ID
from storage.archive import ArchiveSettings
from storage.credentials import credential_paths, masked

__all__ = [
    "CONFIG_ENV",
    "CodecSettings",
    "CredentialsInParametersError",
    "ManifestSettings",
    "MigrationSettings",
    "RateSettings",
    "RaySettings",
    "ReportSettings",
    "refuse_credentials",
    "settings_reference",
]

CONFIG_ENV = "RADIARC_CONFIG"
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("radiarc_config_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateSettings(_Section):
    """Exactly one of these; none given means ``iterations=4``."""

    iterations: int | None = Field(default=None, ge=1, le=16, description="Fixed codec iterations.")
    bpp: float | None = Field(
        default=None,
        gt=0,
        lt=64,
        description="Target bits per pixel per image (its chunks share the budget).",
    )
    min_ssim: float | None = Field(
        default=None, gt=0, lt=1, description="Quality floor: every tile's SSIM at least this."
    )
    min_psnr: float | None = Field(
        default=None,
        gt=0,
        lt=200,
        description="Quality floor: every tile's PSNR (dB) at least this.",
    )
    adaptive: bool = Field(
        default=False,
        description="With bpp: 16x16 blocks stop refining once good enough (more quality per "
        "bit at low rates, several network runs per tile to encode).",
    )
    half_res: bool = Field(
        default=False,
        description="With bpp: a tile may be coded at half resolution and upsampled where that "
        "removes more error per byte (better quality at ~0.125 bpp; 1.25x the encoding work).",
    )
    max_error: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Near-lossless: no pixel off by more than this many levels, 0 for lossless "
        "(network iterations plus a residual layer).",
    )
    residual: bool = Field(
        default=False,
        description="With bpp: a tile may add a residual layer where that removes more error per "
        "byte than more iterations (from ~0.25 bpp on chest X-rays; rates up to lossless).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RateSettings:
        modes = (self.iterations, self.bpp, self.min_ssim, self.min_psnr, self.max_error)
        chosen = [v for v in modes if v is not None]
        if len(chosen) > 1:
            raise ValueError("choose one of iterations, bpp, min_ssim, min_psnr, max_error")
        if self.adaptive and self.bpp is None:
            raise ValueError("adaptive (per-block) rate needs a bpp target")
        if self.half_res and self.bpp is None:
            raise ValueError("half-resolution tiles need a bpp target")
        if self.residual and (self.bpp is None or self.adaptive):
            raise ValueError("residual layers for a bpp target need bpp (and no adaptive)")
        if not chosen:
            object.__setattr__(self, "iterations", 4)
        return self

    def control(self) -> RateControl:
        return RateControl(
            self.iterations,
            self.bpp,
            self.min_ssim,
            self.min_psnr,
            adaptive=self.adaptive,
            half_res=self.half_res,
            max_error=self.max_error,
            residual=self.residual,
        )


class CodecSettings(_Section):
    model_id: str = Field(default=DEFAULT_MODEL_ID, description="Installed codec model id.")
    tile_size: int = Field(
        default=512,
        ge=16,
        le=4096,
        multiple_of=16,
        description="Codec tile = zarr chunk side, pixels.",
    )
    shard_tiles: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Group N x N chunks per stored object (fewer S3 objects).",
    )
    lenient_uids: bool = Field(
        default=False, description="Accept legacy UIDs whose only fault is a leading zero."
    )
    rate: RateSettings = Field(
        default_factory=lambda: RateSettings(), description="Rate or quality."
    )
    refine_steps: int = Field(
        default=0,
        ge=0,
        le=MAX_STEPS,
        description="Search each code this many steps for a better one (8: up to ~1 dB at "
        "low rates, several times the encoding work); readers need nothing.",
    )

    def archive_settings(self) -> ArchiveSettings:
        return ArchiveSettings(
            rate=self.rate.control(),
            model_id=self.model_id,
            tile_size=self.tile_size,
            shard_tiles=self.shard_tiles,
            lenient_uids=self.lenient_uids,
            refine_steps=self.refine_steps,
        )


class RaySettings(_Section):
    address: str | None = Field(
        default=None,
        description="Ray cluster to join (ray://host:10001 or host:6379); default: RAY_ADDRESS, "
        "else a local Ray started for the run.",
    )
    workers: int = Field(
        default=2, ge=1, le=4096, description="Encoder actors (each loads the model)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where actors run the network: auto = CUDA when they hold a GPU.",
    )
    cpus_per_worker: float = Field(
        default=0.5, gt=0, le=256, description="CPUs reserved per actor (fractional allowed)."
    )
    gpus_per_worker: float = Field(
        default=0.0,
        ge=0,
        le=16,
        description="GPUs per actor (fractional: several actors share one).",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="torch threads per actor; default max(1, CPUs per actor).",
    )
    batch_images: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="Images per actor call (their tiles are encoded together).",
    )
    tile_batch: int = Field(
        default=8, ge=1, le=1024, description="Tiles per network call in an actor."
    )
    in_flight: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Batches submitted but not finished; default 2 x workers.",
    )
    local_cpus: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="CPUs of a local Ray (default: all of this machine's).",
    )
    object_store_mb: int = Field(
        default=256, ge=78, le=1_000_000, description="Object store of a local Ray, MB."
    )
    max_restarts: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Times a crashed actor is restarted (its batch re-run).",
    )

    def max_in_flight(self) -> int:
        return self.in_flight or 2 * self.workers


class ManifestSettings(_Section):
    flush_rows: int = Field(
        default=256, ge=1, le=100_000, description="Write a manifest part every N finished images."
    )
    flush_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="... or when its oldest row is this old (seconds).",
    )


class ReportSettings(_Section):
    enabled: bool = Field(
        default=True, description="Write ARCHIVE/reports/<run>/report.md and plots."
    )
    worst_images: int = Field(
        default=4,
        ge=0,
        le=100,
        description="Worst images shown with original/decoded/difference crops.",
    )
    crop: int = Field(default=256, ge=32, le=2048, description="Side of those crops, pixels.")


class MigrationSettings(BaseSettings):
    """Everything a migration run can be told, besides its source and archive."""

    model_config = SettingsConfigDict(
        env_prefix="RADIARC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    run_id: str | None = Field(
        default=None,
        description="Manifest partition of this run; default: UTC time + random suffix.",
    )
    codec: CodecSettings = Field(default_factory=lambda: CodecSettings())
    ray: RaySettings = Field(default_factory=lambda: RaySettings())
    manifest: ManifestSettings = Field(default_factory=lambda: ManifestSettings())
    report: ReportSettings = Field(default_factory=lambda: ReportSettings())
    source_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the source (e.g. endpoint_url)."
    )
    archive_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the archive."
    )
    retry_skipped: bool = Field(
        default=False,
        description="Read again sources whose latest row says they cannot be archived.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get() or (
            Path(os.environ[CONFIG_ENV]) if CONFIG_ENV in os.environ else None
        )
        sources = [init_settings, env_settings]
        if path is not None:
            sources.append(_FileSource(settings_cls, path))
        return (_Layered(settings_cls, sources),)

    @classmethod
    def load(
        cls, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> MigrationSettings:
        """Settings from ``overrides`` (nested dicts, e.g. from flags), the environment, the
        config file and the defaults, in that order."""
        with _config_file(Path(config_file) if config_file else None):
            return cls(**(overrides or {}))

    def __repr_args__(self) -> Any:
        """What ``repr`` shows: storage options with their credentials masked."""
        for name, value in super().__repr_args__():
            if name in ("source_options", "archive_options") and isinstance(value, dict):
                value = masked(value)
            yield name, value

    def ray_address(self) -> str | None:
        return self.ray.address or os.environ.get("RAY_ADDRESS") or None


class _Layered(PydanticBaseSettingsSource):
    """Sources merged key by key, the first winning, except that the rate is one choice: a
    source that sets any rate field replaces the rate of the sources below it (a ``--bpp``
    flag overrides a config file's ``min_ssim`` rather than clashing with it)."""

    def __init__(
        self, settings_cls: type[BaseSettings], sources: list[PydanticBaseSettingsSource]
    ) -> None:
        super().__init__(settings_cls)
        self.sources = sources

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for source in reversed(self.sources):  # lowest precedence first
            layer = source()
            rate = (
                layer.get("codec", {}).get("rate") if isinstance(layer.get("codec"), dict) else None
            )
            if isinstance(rate, dict) and any(value is not None for value in rate.values()):
                merged.get("codec", {}).pop("rate", None)
            merged = _deep_merge(merged, layer)
        return merged


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _FileSource(PydanticBaseSettingsSource):
    """A YAML, TOML or JSON file with the settings' nesting."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        self.data = read_config_file(path)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping a settings file holds (by extension: .yaml/.yml, .toml, .json)."""
    text = Path(path).read_text()
    suffix = Path(path).suffix.lower()
    if suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    elif suffix == ".toml":
        data = tomllib.loads(text)
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path} must be .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


@contextmanager
def _config_file(path: Path | None) -> Iterator[None]:
    token = _CONFIG_FILE.set(path)
    try:
        yield
    finally:
        _CONFIG_FILE.reset(token)


def settings_reference() -> list[tuple[str, str, str, str]]:
    """(environment variable, type, default, description) of every leaf setting."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = "" if field.default_factory else repr(field.default)
            kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
            kind = kind.replace("typing.", "").replace(" | ", " or ")
            rows.append((f"{prefix}{name.upper()}", kind, default, field.description or ""))

    walk(MigrationSettings, "RADIARC_")
    return rows


class CredentialsInParametersError(ValueError):
    """Storage credentials given where they would be stored or shown (flow parameters, flags)."""


def refuse_credentials(overrides: dict[str, Any] | None, where: str) -> None:
    """Raise if ``overrides`` carry storage credentials (named by key, never by value)."""
    found = [
        f"{section}.{path}"
        for section in ("source_options", "archive_options")
        for path in credential_paths(dict((overrides or {}).get(section) or {}))
    ]
    if found:
        raise CredentialsInParametersError(
            f"storage credentials given in {where} ({', '.join(found)}): Radiarc takes them "
            "only from the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an "
            "instance role) or from settings in the environment (RADIARC_SOURCE_OPTIONS, "
            "RADIARC_ARCHIVE_OPTIONS) or a config file, so that they are never stored or logged"
        )
