"""Shipped model weights: found by model id, verified by SHA-256, loaded once per process.

``codec/weights/models.json`` lists each installed model id with its file and hash. A weights
file holds the architecture config, a float16 state dict (half the size; the network runs in
float32), the entropy-coding context tables, how many iterations the model was trained for, and
(from rnnconv-pool-v12) the fitted upsampler of half-resolution tiles (:mod:`codec.upsampler`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codec.bitstream import HASH_BYTES, BitstreamError
from codec.entropy import ContextTables
from codec.model import ModelConfig, RNNConvCodec
from codec.upsampler import Upsampler

WEIGHTS_DIR = Path(__file__).parent / "weights"
REGISTRY = WEIGHTS_DIR / "models.json"
DEFAULT_MODEL_ID = "rnnconv-pool-v8"


class UnknownModelError(BitstreamError):
    """A model id this installation does not have."""


class WeightsIntegrityError(RuntimeError):
    """A weights file whose SHA-256 differs from the registry's: damaged or replaced."""


@dataclass(frozen=True)
class LoadedModel:
    model_id: str
    model: RNNConvCodec
    tables: ContextTables
    weights_hash: bytes  # first HASH_BYTES of the file's SHA-256, as written into streams
    trained_iterations: int
    upsampler: Upsampler | None = None  # None: half tiles are upsampled bicubically


def registry() -> dict[str, dict[str, str]]:
    if not REGISTRY.exists():
        return {}
    return dict(json.loads(REGISTRY.read_text()))


def installed_models() -> list[str]:
    return sorted(registry())


@functools.cache
def load_model(model_id: str = DEFAULT_MODEL_ID) -> LoadedModel:
    """The model with ``model_id``, in eval mode on the best available device."""
    entries = registry()
    if model_id not in entries:
        raise UnknownModelError(
            f"model id {model_id!r} is not installed; installed: {installed_models() or 'none'}"
        )
    path = WEIGHTS_DIR / entries[model_id]["file"]
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entries[model_id]["sha256"]:
        raise WeightsIntegrityError(f"{path} has SHA-256 {digest}, expected the registry's")
    payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    model = RNNConvCodec(ModelConfig.from_dict(json.loads(payload["config"])))
    model.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    model.eval()
    if torch.cuda.is_available():
        model = model.cuda()
    tables = ContextTables(
        payload["pass_a"].numpy().astype(np.uint16), payload["pass_b"].numpy().astype(np.uint16)
    )
    return LoadedModel(
        model_id=model_id,
        model=model,
        tables=tables,
        weights_hash=bytes.fromhex(digest)[:HASH_BYTES],
        trained_iterations=int(payload["trained_iterations"]),
        upsampler=_upsampler(payload),
    )


def _upsampler(payload: dict[str, Any]) -> Upsampler | None:
    if "upsampler_kernels" not in payload:
        return None  # weights from before stop 18: their streams were written with bicubic
    kernels, biases = payload["upsampler_kernels"], payload["upsampler_biases"]
    return Upsampler(kernels.numpy().astype(np.float32), biases.numpy().astype(np.float32))


def model_device(loaded: LoadedModel) -> torch.device:
    return next(loaded.model.parameters()).device


def write_weights(
    model: RNNConvCodec,
    tables: ContextTables,
    model_id: str,
    trained_iterations: int,
    directory: Path = WEIGHTS_DIR,
    upsampler: Upsampler | None = None,
) -> Path:
    """Write ``model_id``'s weights file and add it to the registry in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": json.dumps(model.config.to_dict()),
        "state_dict": {k: v.detach().cpu().half() for k, v in model.state_dict().items()},
        "pass_a": torch.from_numpy(tables.pass_a.astype(np.int32)),
        "pass_b": torch.from_numpy(tables.pass_b.astype(np.int32)),
        "trained_iterations": trained_iterations,
    }
    if upsampler is not None:  # float32: the filter is small and its taps are not rounded
        payload["upsampler_kernels"] = torch.from_numpy(upsampler.kernels)
        payload["upsampler_biases"] = torch.from_numpy(upsampler.biases)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = directory / f"{model_id}.pt"
    path.write_bytes(buffer.getvalue())
    registry_path = directory / "models.json"
    entries = json.loads(registry_path.read_text()) if registry_path.exists() else {}
    entries[model_id] = {"file": path.name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    registry_path.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return path
