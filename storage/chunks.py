"""What an archived array really occupies, read from the stored objects themselves.

The manifest reports real bytes (never an estimate) and how many codec iterations each tile
kept; both come from the chunk objects as stored: plain zarr v3 chunks (``c/<row>/<col>``)
or shards, whose inner chunk streams are located through the shard index (zarr's default
layout: at the end, ``(offset, nbytes)`` uint64 little-endian pairs plus a CRC32C).
Chunks zarr never wrote (all fill value) cost nothing and are not counted.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import Any

from fsspec import AbstractFileSystem

from codec import bitstream
from codec.bitstream import BitstreamError
from storage.fsutil import join

__all__ = ["StoredChunks", "stored_chunks"]

_ENVELOPE_BYTES = 16  # codec.chunk's header in front of every chunk's Radiarc stream
_EMPTY = 2**64 - 1
_CRC_BYTES = 4


@dataclass(frozen=True)
class StoredChunks:
    """Bytes of the stored chunk (or shard) objects and the iterations each coded tile kept."""

    n_bytes: int
    tile_iterations: list[int]


def stored_chunks(
    fs: AbstractFileSystem, array_path: str, metadata: dict[str, Any]
) -> StoredChunks:
    """Sizes and iterations of the array at ``array_path``, whose zarr.json is ``metadata``."""
    shape = [int(side) for side in metadata["shape"]]
    outer = [int(side) for side in metadata["chunk_grid"]["configuration"]["chunk_shape"]]
    codecs = metadata["codecs"]
    sharding = codecs[0]["configuration"] if codecs[0]["name"] == "sharding_indexed" else None
    keys = [
        join(array_path, "c", *map(str, index))
        for index in product(*(range(math.ceil(s / c)) for s, c in zip(shape, outer, strict=True)))
    ]
    objects = fs.cat(keys, on_error="omit") if keys else {}
    if isinstance(objects, bytes):  # fsspec returns bare bytes for a single path
        objects = {keys[0]: objects}
    n_bytes = sum(len(data) for data in objects.values())
    iterations: list[int] = []
    for data in objects.values():
        streams = _inner_chunks(data, outer, sharding) if sharding else iter([data])
        for stream in streams:
            iterations += _iterations(stream)
    return StoredChunks(n_bytes, iterations)


def _inner_chunks(data: bytes, shard: list[int], config: dict[str, Any]) -> Iterator[bytes]:
    inner = [int(side) for side in config["chunk_shape"]]
    count = math.prod(math.ceil(s / c) for s, c in zip(shard, inner, strict=True))
    index_codecs = [codec["name"] for codec in config.get("index_codecs", [])]
    if config.get("index_location", "end") != "end" or index_codecs != ["bytes", "crc32c"]:
        raise BitstreamError(f"unsupported shard index layout {index_codecs}")
    size = 16 * count + _CRC_BYTES
    if len(data) < size:
        raise BitstreamError("shard shorter than its index")
    index = struct.unpack_from(f"<{2 * count}Q", data, len(data) - size)
    for offset, length in zip(index[0::2], index[1::2], strict=True):
        if offset == _EMPTY and length == _EMPTY:
            continue
        yield data[offset : offset + length]


def _iterations(chunk: bytes) -> list[int]:
    """Iterations per tile of one chunk stream; none for a chunk of one value."""
    stream = chunk[_ENVELOPE_BYTES:]
    if not stream:
        return []
    return [len(segments) for segments in bitstream.unpack(stream).tiles]
