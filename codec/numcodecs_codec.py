"""The learned codec as a numcodecs codec: the compressor of zarr v2 arrays.

One 2-D uint8/uint16 chunk becomes one chunk stream (:mod:`codec.chunk`) and back. zarr finds
the class through the ``numcodecs.codecs`` entry point ``radiarc.rnnconv``, so readers never
import Radiarc; :func:`register_codecs` registers it (and the zarr v3 codec) explicitly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_bytes, ndarray_copy
from numcodecs.registry import register_codec

from codec.chunk import CODEC_ID, ChunkSettings, decode_chunk, encode_chunk
from codec.weights import DEFAULT_MODEL_ID


class RadiarcCodec(Codec):
    """Learned RNN-Conv compression of one chunk, the chunk being one codec tile.

    Exactly one rate setting: ``iterations``, ``bpp``, ``min_ssim``, ``min_psnr`` (the two
    floors the encoder checks on decoded pixels) or ``max_error`` (no pixel off by more; 0 is
    lossless: a residual layer, codec/near_lossless.py); with ``bpp``, ``adaptive=True`` lets
    each 16x16 block stop refining once good enough, and ``half_res=True`` lets the chunk be
    coded at half resolution when that removes more error per byte, and ``residual=True`` lets
    it add a residual layer where that does (codec/near_lossless.py). ``refine_steps`` spends
    more encoding time for better codes (codec/refine.py); readers need nothing.
    ``weights_hash`` defaults to the installed model's; encoding refuses other weights,
    decoding follows each stream's header.
    """

    codec_id = CODEC_ID

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        weights_hash: str | None = None,
        bits_stored: int | None = None,
        iterations: int | None = None,
        bpp: float | None = None,
        min_ssim: float | None = None,
        min_psnr: float | None = None,
        adaptive: bool = False,
        half_res: bool = False,
        max_error: int | None = None,
        residual: bool = False,
        refine_steps: int = 0,
    ) -> None:
        self.settings = ChunkSettings.create(
            model_id=model_id,
            weights_hash=weights_hash,
            bits_stored=bits_stored,
            iterations=iterations,
            bpp=bpp,
            min_ssim=min_ssim,
            min_psnr=min_psnr,
            adaptive=adaptive,
            half_res=half_res,
            max_error=max_error,
            residual=residual,
            refine_steps=refine_steps,
        )

    def encode(self, buf: Any) -> bytes:
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"{CODEC_ID} encodes a 2-D chunk array, got {type(buf).__name__}")
        return encode_chunk(buf, self.settings)

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        shape: tuple[int, ...] = tuple(getattr(out, "shape", ()))
        expected = (int(shape[-2]), int(shape[-1])) if len(shape) >= 2 else None
        chunk = decode_chunk(ensure_bytes(buf), expected)
        return chunk if out is None else ndarray_copy(chunk, out)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, **self.settings.to_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RadiarcCodec:
        config = {k: v for k, v in config.items() if k != "id"}
        return cls(**ChunkSettings.from_config(config).to_config())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RadiarcCodec) and self.settings == other.settings

    def __hash__(self) -> int:
        return hash(self.settings)

    def __repr__(self) -> str:
        arguments = ", ".join(
            f"{k}={v!r}" for k, v in self.settings.to_config().items() if v is not None
        )
        return f"{type(self).__name__}({arguments})"


def register_codecs() -> None:
    """Register the numcodecs codec and the zarr v3 codec in this process, without entry points."""
    from codec import zarr_codec  # the zarr v3 wrapper imports zarr; v2 users may not need it

    register_codec(RadiarcCodec)
    zarr_codec.register()
