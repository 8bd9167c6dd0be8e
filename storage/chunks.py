"""Chunk objects of an archived array: written from streams encoded elsewhere, and measured.

A migration worker encodes the chunks of many images in one batch (codec.chunk.encode_chunks)
rather than letting zarr call the codec one chunk at a time; :func:`chunk_arrays` cuts an image
into exactly the chunks zarr would hand the codec and :func:`put_chunks` stores the encoded
streams where zarr looks for them (plain ``c/<row>/<col>`` objects, or shards with their index),
so the array reads back through plain zarr as if zarr had written it.

What an archived array really occupies is read from the stored objects themselves.

The manifest reports real bytes (never an estimate) and how many codec iterations each tile
kept; both come from the chunk objects as stored: plain zarr v3 chunks (``c/<row>/<col>``)
or shards, whose inner chunk streams are located through the shard index (zarr's default
layout: at the end, ``(offset, nbytes)`` uint64 little-endian pairs plus a CRC32C).
Chunks zarr never wrote (all fill value) cost nothing and are not counted.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import product
from typing import Any

import google_crc32c
import numpy as np
from fsspec import AbstractFileSystem

from codec import bitstream
from codec.bitstream import BitstreamError
from storage.fsutil import is_local, join

__all__ = ["ChunkIndex", "StoredChunks", "chunk_arrays", "put_chunks", "stored_chunks"]

ChunkIndex = tuple[int, int]

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


def chunk_arrays(pixels: np.ndarray, chunk: int) -> list[tuple[ChunkIndex, np.ndarray]]:
    """The chunks zarr would encode for a 2-D array of ``chunk`` x ``chunk`` chunks and fill
    value 0: edge chunks padded with zeros to full size, all-zero chunks left out (zarr does
    not write them; they read back as the fill value)."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {pixels.shape}")
    height, width = pixels.shape
    chunks = []
    for row in range(math.ceil(height / chunk)):
        for col in range(math.ceil(width / chunk)):
            part = pixels[row * chunk : (row + 1) * chunk, col * chunk : (col + 1) * chunk]
            if not part.any():
                continue
            padded = np.zeros((chunk, chunk), dtype=pixels.dtype)
            padded[: part.shape[0], : part.shape[1]] = part
            chunks.append(((row, col), padded))
    return chunks


def put_chunks(
    fs: AbstractFileSystem,
    array_path: str,
    metadata: dict[str, Any],
    encoded: Mapping[ChunkIndex, bytes],
) -> int:
    """Store encoded chunk streams into the (already created) array at ``array_path``, whose
    zarr.json is ``metadata``; returns the bytes written. Plain arrays get one object per chunk;
    sharded ones one object per shard: the inner chunks back to back, then the index of
    ``(offset, nbytes)`` little-endian uint64 pairs in C order (empty: both 2**64-1) and its
    CRC32C, as zarr's ``sharding_indexed`` codec with default index codecs writes it."""
    encoding = metadata.get("chunk_key_encoding", {})
    separator = encoding.get("configuration", {}).get("separator", "/")
    if encoding.get("name", "default") != "default" or separator != "/":
        raise ValueError(f"unsupported chunk key encoding {encoding}")
    codecs = metadata["codecs"]
    if codecs[0]["name"] == "sharding_indexed":
        outer = [int(side) for side in metadata["chunk_grid"]["configuration"]["chunk_shape"]]
        objects = _shards(encoded, outer, codecs[0]["configuration"])
    else:
        objects = {index: data for index, data in encoded.items()}
    paths = {join(array_path, "c", *map(str, index)): data for index, data in objects.items()}
    if is_local(fs):
        for parent in {path.rsplit("/", 1)[0] for path in paths}:
            fs.makedirs(parent, exist_ok=True)
    if paths:
        fs.pipe(paths)
    return sum(len(data) for data in paths.values())


def _shards(
    encoded: Mapping[ChunkIndex, bytes], shard: list[int], config: dict[str, Any]
) -> dict[ChunkIndex, bytes]:
    inner = [int(side) for side in config["chunk_shape"]]
    index_codecs = [codec["name"] for codec in config.get("index_codecs", [])]
    if config.get("index_location", "end") != "end" or index_codecs != ["bytes", "crc32c"]:
        raise BitstreamError(f"unsupported shard index layout {index_codecs}")
    per_shard = [s // c for s, c in zip(shard, inner, strict=True)]
    members: dict[ChunkIndex, dict[ChunkIndex, bytes]] = defaultdict(dict)
    for (row, col), data in encoded.items():
        members[(row // per_shard[0], col // per_shard[1])][
            (row % per_shard[0], col % per_shard[1])
        ] = data
    shards = {}
    for shard_index, chunks in members.items():
        body, entries, offset = [], [], 0
        for position in product(range(per_shard[0]), range(per_shard[1])):
            stream = chunks.get((position[0], position[1]))
            if stream is None:
                entries += [_EMPTY, _EMPTY]
                continue
            body.append(stream)
            entries += [offset, len(stream)]
            offset += len(stream)
        index = struct.pack(f"<{len(entries)}Q", *entries)
        checksum = struct.pack("<I", google_crc32c.value(index))
        shards[shard_index] = b"".join(body) + index + checksum
    return shards
