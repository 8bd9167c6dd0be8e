"""One zarr chunk to one chunk stream and back: the core the numcodecs and zarr codecs share.

zarr hands a codec edge chunks padded to the full chunk shape with the fill value, and a
radiograph's own borders are often one constant value too. Both are handled the same way,
without knowing the fill value: the trailing rows and columns that all hold the value of the
chunk's last pixel are cut off, only the top-left block left over goes through the learned
codec (one tile, extended to the network grid by edge replication, so it costs nothing), and
decoding puts that value back exactly. A chunk of one value costs only the envelope.

Chunk stream layout (little-endian; docs/zarr.md):

    magic         4 bytes  b"RDCK"
    version       u8       2 (version 1, without the checksum, is still read)
    chunk shape   u32, u32 rows, columns zarr expects back
    item size     u8       1 (uint8) or 2 (uint16)
    pad value     u16      the value outside the coded block
    crc32         u32      of the 16 bytes above (version 2): a flipped pad value or shape
                           would otherwise change pixels silently
    stream        a Radiarc stream (docs/bitstream.md) of the top-left block, whose header
                  records the block's height and width; absent when the whole chunk is pad
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codec import bitstream
from codec.batch import DEFAULT_BATCH_SIZE, block_candidates
from codec.bitstream import HASH_BYTES, BitstreamError
from codec.io import GrayImage
from codec.learned import (
    EncodeResult,
    TileCandidates,
    decode_image,
    encode_image,
    select_within_budget,
)
from codec.near_lossless import ResidualCandidates, select_layered
from codec.rate import RateControl
from codec.refine import MAX_STEPS
from codec.tiling import padded_side
from codec.weights import DEFAULT_MODEL_ID, UnknownModelError, installed_models, registry

CODEC_ID = "radiarc.rnnconv"
MAGIC = b"RDCK"
VERSION = 2
_ENVELOPE = struct.Struct("<4sBIIBH")  # both versions; version 2 adds a CRC-32 after it
_CRC = struct.Struct("<I")
# "adaptive" (block stops), "half_res" (half-resolution tiles) and "residual" (layered tiles),
# all with bpp, are written only when true, and "max_error" (a residual layer) only when set,
# so older configs read the same.
RATE_KEYS = (
    *("iterations", "bpp", "min_ssim", "min_psnr"),
    *("adaptive", "half_res", "max_error", "residual"),
)
# zarr decodes chunks on several threads at once; the network already uses every core (or the
# GPU), so one chunk at a time avoids oversubscription and a double first load of the weights.
_NETWORK = threading.Lock()


def installed_weights_hash(model_id: str) -> str:
    """The installed weights' hash as streams record it (hex), read from the registry only."""
    entry = registry().get(model_id)
    if entry is None:
        raise UnknownModelError(
            f"model id {model_id!r} is not installed; installed: {installed_models() or 'none'}"
        )
    return entry["sha256"][: 2 * HASH_BYTES]


@dataclass(frozen=True)
class ChunkSettings:
    """What a codec configuration holds: the model, its weights, the rate, the bit depth.

    ``bits_stored`` None means every bit of the chunk's dtype (8 or 16).
    """

    model_id: str
    weights_hash: str
    rate: RateControl
    bits_stored: int | None = None
    #: Encoder effort (codec/refine.py): decoding and the stream format do not depend on it.
    refine_steps: int = 0

    def __post_init__(self) -> None:
        if len(self.weights_hash) != 2 * HASH_BYTES or not _is_hex(self.weights_hash):
            raise ValueError(f"weights_hash must be {2 * HASH_BYTES} hex digits")
        if self.bits_stored is not None and not 8 <= self.bits_stored <= 16:
            raise ValueError(f"bits_stored must be in 8..16, got {self.bits_stored}")
        if not 0 <= self.refine_steps <= MAX_STEPS:
            raise ValueError(f"refine_steps must be in 0..{MAX_STEPS}")

    @classmethod
    def create(
        cls,
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
    ) -> ChunkSettings:
        """Validated settings; without ``weights_hash``, the installed model's."""
        rate = RateControl(
            iterations,
            bpp,
            min_ssim,
            min_psnr,
            adaptive=adaptive,
            half_res=half_res,
            max_error=max_error,
            residual=residual,
        )
        weights_hash = weights_hash or installed_weights_hash(model_id)
        return cls(model_id, weights_hash, rate, bits_stored, refine_steps)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ChunkSettings:
        known = {"model_id", "weights_hash", "bits_stored", "refine_steps", *RATE_KEYS}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown {CODEC_ID} settings: {sorted(unknown)}")
        return cls.create(**config)

    def to_config(self) -> dict[str, Any]:
        """Plain JSON: model id, weights hash, bits stored and the one rate setting used."""
        config: dict[str, Any] = {
            "model_id": self.model_id,
            "weights_hash": self.weights_hash,
            "bits_stored": self.bits_stored,
        }
        config.update(rate_config(self.rate))
        if self.refine_steps:  # written only when used, so older configs read the same
            config["refine_steps"] = self.refine_steps
        return config


def rate_config(rate: RateControl) -> dict[str, Any]:
    """The rate settings in use, as configs store them: unset (None) and false modes left out,
    a max error of 0 (lossless) kept."""
    values = {key: getattr(rate, key) for key in RATE_KEYS}
    return {key: value for key, value in values.items() if value is not None and value is not False}


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def as_chunk(array: np.ndarray) -> np.ndarray:
    """The 2-D uint8/uint16 chunk inside ``array`` (leading axes of length 1 are dropped)."""
    if array.ndim < 2 or any(side != 1 for side in array.shape[:-2]):
        raise ValueError(f"{CODEC_ID} codes 2-D chunks, got shape {array.shape}")
    if not all(0 < side <= bitstream.MAX_SIDE for side in array.shape[-2:]):
        raise ValueError(f"{CODEC_ID} codes chunks of 1..{bitstream.MAX_SIDE} pixels a side")
    if array.dtype.kind != "u" or array.dtype.itemsize not in (1, 2):
        raise ValueError(f"{CODEC_ID} codes uint8 or uint16 chunks, got {array.dtype}")
    return array.reshape(array.shape[-2:]).astype(array.dtype.newbyteorder("="), copy=False)


def content_extent(chunk: np.ndarray) -> tuple[int, int, int]:
    """``(height, width, value)``: outside the top-left ``height x width`` block every pixel
    equals ``value``, the last pixel's (zarr's padding of an edge chunk, or a flat border)."""
    value = int(chunk[-1, -1])
    differs = chunk != value
    rows = np.flatnonzero(differs.any(axis=1))
    if rows.size == 0:
        return 0, 0, value
    height = int(rows[-1]) + 1
    width = int(np.flatnonzero(differs[:height].any(axis=0))[-1]) + 1
    return height, width, value


def encode_chunk(array: np.ndarray, settings: ChunkSettings) -> bytes:
    """The chunk stream of one chunk under ``settings``."""
    chunk = as_chunk(np.asarray(array))
    _check_weights(settings)
    height, width, value = content_extent(chunk)
    envelope = pack_envelope(chunk.shape, chunk.dtype.itemsize, value)
    if height == 0:
        return envelope
    bits = settings.bits_stored or 8 * chunk.dtype.itemsize
    block = GrayImage(np.ascontiguousarray(chunk[:height, :width]), bits)
    tile_size = padded_side(max(height, width))  # the whole block is one tile
    with _NETWORK:
        result = encode_image(
            block, settings.rate, settings.model_id, tile_size, settings.refine_steps
        )
    return envelope + result.data


@dataclass(frozen=True)
class EncodedChunk:
    """A chunk stream, the iterations its tile kept (0: a chunk of one value, or one its
    residual layer codes alone) and whether it
    met its rate target or quality floor."""

    data: bytes
    iterations: int
    target_met: bool


def encode_chunks(
    chunks: Sequence[np.ndarray],
    settings: Sequence[ChunkSettings],
    batch_size: int = DEFAULT_BATCH_SIZE,
    images: Sequence[int] | None = None,
) -> list[EncodedChunk]:
    """:func:`encode_chunk` for many chunks (of many images) at once, ``settings[i]`` for
    ``chunks[i]``: the same stream format, with the network run over ``batch_size`` tiles per
    call (:mod:`codec.batch`) instead of one chunk at a time.

    ``images[i]`` names the image chunk ``i`` belongs to. Under a bpp target (without block
    stops) the chunks of one image then share one budget, the image's pixels times the bpp:
    bytes go to the chunks where they remove the most error, and the image as a whole, not
    each chunk, stays within the target. Without ``images`` each chunk has its own budget,
    as when zarr encodes chunk by chunk."""
    if len(chunks) != len(settings):
        raise ValueError(f"{len(chunks)} chunks but {len(settings)} settings")
    if images is not None and len(images) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {len(images)} image numbers")
    results: list[EncodedChunk | None] = [None] * len(chunks)
    groups: dict[tuple[str, RateControl, int], list[tuple[int, bytes, GrayImage]]]
    groups = defaultdict(list)
    for index, (original, config) in enumerate(zip(chunks, settings, strict=True)):
        chunk = as_chunk(np.asarray(original))
        _check_weights(config)
        height, width, value = content_extent(chunk)
        envelope = pack_envelope(chunk.shape, chunk.dtype.itemsize, value)
        if height == 0:
            results[index] = EncodedChunk(envelope, 0, True)
            continue
        bits = config.bits_stored or 8 * chunk.dtype.itemsize
        block = GrayImage(np.ascontiguousarray(chunk[:height, :width]), bits)
        groups[(config.model_id, config.rate, config.refine_steps)].append((index, envelope, block))
    for (model_id, rate, refine_steps), members in groups.items():
        if rate.residual:
            blocks = [block for _, _, block in members]
            order = [index for index, _, _ in members]
            layered = _encode_layered(blocks, model_id, rate, refine_steps, order, images)
            for (index, envelope, _), result in zip(members, layered, strict=True):
                results[index] = EncodedChunk(
                    envelope + result.data, result.tile_iterations[0], result.target_met
                )
            continue
        if rate.adaptive or rate.max_error is not None:
            # Each chunk searches its own block-stop threshold, or codes its own residual
            # layer on the decoder's pixels: no batching across chunks.
            for index, envelope, block in members:
                tile_size = padded_side(max(block.pixels.shape))  # the whole block is one tile
                with _NETWORK:
                    result = encode_image(block, rate, model_id, tile_size, refine_steps)
                results[index] = EncodedChunk(
                    envelope + result.data, result.tile_iterations[0], result.target_met
                )
            continue
        with _NETWORK:
            candidates = block_candidates(
                [block for _, _, block in members],
                rate.iterations,
                model_id,
                with_ssim=rate.min_ssim is not None,
                batch_size=batch_size,
                refine_steps=refine_steps,
                half_res=rate.half_res,
                measure=rate.iterations is None,
            )
        selected = _select(candidates, rate, [index for index, _, _ in members], images)
        for (index, envelope, _), result in zip(members, selected, strict=True):
            results[index] = EncodedChunk(
                envelope + result.data, result.tile_iterations[0], result.target_met
            )
    return [result for result in results if result is not None]


def _encode_layered(
    blocks: list[GrayImage],
    model_id: str,
    rate: RateControl,
    refine_steps: int,
    indices: list[int],
    images: Sequence[int] | None,
) -> list[EncodeResult]:
    """Chunks under a bpp target with residual layers allowed: each chunk's network run and
    layers alone, one budget per image when ``images`` groups them (``indices`` are the
    blocks' places in it)."""
    with _NETWORK:
        candidates = [
            ResidualCandidates.for_bpp(
                block, model_id, padded_side(max(block.pixels.shape)), rate.half_res, refine_steps
            )
            for block in blocks
        ]
    bpp = rate.bpp or 0.0
    return _per_image(
        indices, images, lambda positions: select_layered([candidates[p] for p in positions], bpp)
    )


def _select(
    candidates: list[TileCandidates],
    rate: RateControl,
    indices: list[int],
    images: Sequence[int] | None,
) -> list[EncodeResult]:
    """Each chunk's stream under ``rate``: one budget per image under a bpp target when
    ``images`` groups the chunks (``indices`` are the candidates' places in it)."""
    bpp = rate.bpp
    if images is None or bpp is None:
        return [candidate.select(rate) for candidate in candidates]
    return _per_image(
        indices,
        images,
        lambda positions: select_within_budget(
            [candidates[p] for p in positions], bpp, half_res=rate.half_res
        ),
    )


def _per_image(
    indices: list[int],
    images: Sequence[int] | None,
    select: Callable[[list[int]], list[EncodeResult]],
) -> list[EncodeResult]:
    """One result per chunk: ``select`` called once with the positions of each image's chunks
    (``images[indices[position]]`` names a chunk's image; without ``images``, each chunk is
    its own image), its results put back in the chunks' order."""
    groups: dict[int, list[int]] = defaultdict(list)
    for position, index in enumerate(indices):
        groups[images[index] if images is not None else -1 - position].append(position)
    selected: list[EncodeResult | None] = [None] * len(indices)
    for positions in groups.values():
        for position, result in zip(positions, select(positions), strict=True):
            selected[position] = result
    return [result for result in selected if result is not None]


def _check_weights(settings: ChunkSettings) -> None:
    installed = installed_weights_hash(settings.model_id)
    if installed != settings.weights_hash:
        raise ValueError(
            f"codec is configured for {settings.model_id} weights {settings.weights_hash}, "
            f"but the installed weights are {installed}"
        )


def pack_envelope(shape: tuple[int, ...], itemsize: int, value: int) -> bytes:
    """The current (version 2) envelope: fields plus a CRC-32 of them."""
    head = _ENVELOPE.pack(MAGIC, VERSION, *shape, itemsize, value)
    return head + _CRC.pack(zlib.crc32(head))


def parse_envelope(data: bytes) -> tuple[tuple[int, int, int, int], bytes]:
    """``((rows, columns, item size, pad value), Radiarc stream)`` of a chunk stream, the
    envelope checked (magic, version, checksum, bounds) before anything is allocated."""
    if len(data) < _ENVELOPE.size:
        raise BitstreamError(f"chunk stream truncated ({len(data)} bytes)")
    magic, version, rows, cols, itemsize, value = _ENVELOPE.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError("not a Radiarc chunk stream (bad magic bytes)")
    if version not in (1, VERSION):
        raise BitstreamError(f"unknown chunk stream version {version} (this reads 1..{VERSION})")
    size = _ENVELOPE.size
    if version >= 2:
        if len(data) < size + _CRC.size:
            raise BitstreamError(f"chunk stream truncated ({len(data)} bytes)")
        (stored,) = _CRC.unpack_from(data, size)
        if zlib.crc32(data[:size]) != stored:
            raise BitstreamError("chunk envelope checksum mismatch")
        size += _CRC.size
    side = bitstream.MAX_SIDE
    if itemsize not in (1, 2) or not (0 < rows <= side and 0 < cols <= side):
        raise BitstreamError(f"bad chunk shape {rows}x{cols} or item size {itemsize}")
    if rows * cols > bitstream.MAX_PIXELS:
        raise BitstreamError(f"chunk {rows}x{cols} over {bitstream.MAX_PIXELS} pixels")
    if value >> (8 * itemsize):
        raise BitstreamError(f"pad value {value} does not fit {itemsize}-byte pixels")
    return (rows, cols, itemsize, value), data[size:]


def decode_chunk(data: bytes, expected: tuple[int, int] | None = None) -> np.ndarray:
    """The chunk a chunk stream holds, in the shape and dtype it was written with.

    ``expected`` is the chunk shape the reader's array declares: a stream declaring another
    is refused before anything is allocated (a corrupt or hostile chunk must not make the
    reader allocate what it claims)."""
    envelope, stream = parse_envelope(bytes(data))
    rows, cols, itemsize, value = envelope
    if expected is not None and (rows, cols) != tuple(expected):
        raise BitstreamError(f"chunk stream holds {rows}x{cols}, the array expects {expected}")
    chunk = np.full((rows, cols), value, dtype=np.uint8 if itemsize == 1 else np.uint16)
    if stream:
        header = bitstream.read_header(stream)
        if header.height > rows or header.width > cols or header.bits_stored > 8 * itemsize:
            raise BitstreamError(
                f"coded block {header.height}x{header.width} of {header.bits_stored} bits "
                f"does not fit the {rows}x{cols} chunk of {itemsize}-byte pixels"
            )
        with _NETWORK:
            block = decode_image(stream).pixels
        chunk[: header.height, : header.width] = block
    return chunk
