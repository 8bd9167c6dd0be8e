"""The learned codec as a zarr v3 array-to-bytes codec, for plain and sharded v3 arrays.

A thin wrapper over :mod:`codec.chunk`, shaped like zarr's own ``codecs/gzip.py``. zarr finds it
through the ``zarr.codecs`` entry point ``radiarc.rnnconv`` (the codec's name in array
metadata), so ``zarr.open`` reads Radiarc archives with no import of ours. Inside a
``ShardingCodec`` each inner chunk is one stream, and a region read decodes only its chunks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

from codec.bitstream import BitstreamError
from codec.chunk import CODEC_ID, ChunkSettings, decode_chunk, encode_chunk
from codec.weights import DEFAULT_MODEL_ID

if TYPE_CHECKING:
    from typing import Any, Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype import ZDType


@dataclass(frozen=True)
class RadiarcZarrCodec(ArrayBytesCodec):
    """Learned RNN-Conv compression, one stream per chunk; the parameters of
    :class:`codec.numcodecs_codec.RadiarcCodec`, keyword-only."""

    is_fixed_size = False

    settings: ChunkSettings

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
        settings = ChunkSettings.create(
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
        object.__setattr__(self, "settings", settings)

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, configuration = parse_named_configuration(data, CODEC_ID)
        return cls(**ChunkSettings.from_config(configuration).to_config())

    def to_dict(self) -> dict[str, JSON]:
        return {"name": CODEC_ID, "configuration": self.settings.to_config()}

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        """Write the bit depth into the metadata: all of the dtype's bits unless given."""
        native = array_spec.dtype.to_native_dtype()
        if self.settings.bits_stored is not None or native.itemsize not in (1, 2):
            return self  # validate() explains what is wrong with other dtypes
        evolved = replace(self.settings, bits_stored=8 * native.itemsize)
        return type(self)(**evolved.to_config())

    def validate(
        self, *, shape: tuple[int, ...], dtype: ZDType[Any, Any], chunk_grid: ChunkGrid
    ) -> None:
        native = dtype.to_native_dtype()
        if native.kind != "u" or native.itemsize not in (1, 2):
            raise ValueError(f"{CODEC_ID} codes uint8 or uint16 arrays, not {native}")
        bits = self.settings.bits_stored
        if bits is not None and bits > 8 * native.itemsize:
            raise ValueError(f"bits_stored {bits} does not fit {native}")
        if len(shape) < 2:
            raise ValueError(f"{CODEC_ID} codes 2-D chunks; the array has shape {shape}")
        if isinstance(chunk_grid, RegularChunkGrid) and any(
            side != 1 for side in chunk_grid.chunk_shape[:-2]
        ):
            raise ValueError(f"{CODEC_ID} needs chunks of 1 along all but the last two axes")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        rows, cols = chunk_spec.shape[-2:]
        chunk = decode_chunk(chunk_bytes.to_bytes(), expected=(rows, cols))
        native = chunk_spec.dtype.to_native_dtype()
        if chunk.size != int(np.prod(chunk_spec.shape)) or chunk.dtype.itemsize != native.itemsize:
            raise BitstreamError(
                f"chunk stream holds {chunk.shape} {chunk.dtype}, "
                f"the array expects {chunk_spec.shape} {native}"
            )
        return chunk_spec.prototype.nd_buffer.from_numpy_array(
            chunk.astype(native, copy=False).reshape(chunk_spec.shape)
        )

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode_chunk(chunk_array.as_numpy_array(), self.settings)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    def compute_encoded_size(self, _input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size, like every compressor


def register() -> None:
    """Register the codec with zarr in this process (entry points do it for readers)."""
    register_codec(CODEC_ID, RadiarcZarrCodec)
