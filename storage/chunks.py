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

Integrity: :func:`chunks_sha256` is the SHA-256 of an array's stored chunk objects, recorded
when the array is archived and checked again on export and by ``radiarc verify``
(storage.verify); :func:`pixels_sha256` names decoded pixels the same way.
:func:`chunk_objects` reads the objects once and :func:`array_from_objects` decodes exactly
those bytes, so what is checked is what is decoded.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import google_crc32c
import numpy as np
import zarr
import zarr.storage
from fsspec import AbstractFileSystem
from zarr.core.buffer import cpu

from codec import bitstream
from codec.batch import DEFAULT_BATCH_SIZE
from codec.bitstream import BitstreamError
from codec.chunk import ChunkSettings, encode_chunks, parse_envelope
from storage.fsutil import is_local, join

__all__ = [
    "CHUNKS_DIGEST",
    "ChunkIndex",
    "StoredChunks",
    "array_from_objects",
    "check_objects",
    "chunk_arrays",
    "chunk_objects",
    "chunks_sha256",
    "encode_images_chunks",
    "pixels_sha256",
    "put_chunks",
    "stored_chunks",
]

ChunkIndex = tuple[int, int]

_EMPTY = 2**64 - 1
_CRC_BYTES = 4
#: Name of the digest :func:`chunks_sha256` computes, recorded beside it (``radiarc.stored``).
CHUNKS_DIGEST = "sha256"


@dataclass(frozen=True)
class StoredChunks:
    """Bytes of the stored chunk (or shard) objects and the iterations each coded tile kept;
    ``sha256`` (:func:`chunks_sha256`) and the number of ``objects`` name exactly what is
    stored. Equality compares the measurements only: two equally good layouts of the same
    streams (zarr and :func:`put_chunks` may order a shard's chunks differently) are equal."""

    n_bytes: int
    tile_iterations: list[int]
    sha256: str = field(default="", compare=False)
    objects: int = field(default=0, compare=False)


def stored_chunks(
    fs: AbstractFileSystem, array_path: str, metadata: dict[str, Any]
) -> StoredChunks:
    """Sizes, iterations and digest of the array at ``array_path``, whose zarr.json is
    ``metadata``; a corrupt chunk stream raises :class:`BitstreamError`."""
    objects = chunk_objects(fs, array_path, metadata)
    sharding = _sharding(metadata)
    outer = _outer_chunk_shape(metadata)
    iterations: list[int] = []
    for data in objects.values():
        streams = _inner_chunks(data, outer, sharding) if sharding else iter([data])
        for stream in streams:
            iterations += _iterations(stream)
    return StoredChunks(
        sum(len(data) for data in objects.values()),
        iterations,
        chunks_sha256(objects),
        len(objects),
    )


def chunk_objects(
    fs: AbstractFileSystem, array_path: str, metadata: dict[str, Any]
) -> dict[str, bytes]:
    """The stored chunk (or shard) objects of the array at ``array_path`` (zarr.json
    ``metadata``), keyed by their path inside the array (``c/<row>/<col>``), in chunk-grid
    order; chunks never written (all fill value) are absent. One batched read."""
    shape = [int(side) for side in metadata["shape"]]
    outer = _outer_chunk_shape(metadata)
    relative = [
        "/".join(["c", *map(str, index)])
        for index in product(*(range(math.ceil(s / c)) for s, c in zip(shape, outer, strict=True)))
    ]
    keys = [join(array_path, key) for key in relative]
    found = fs.cat(keys, on_error="omit") if keys else {}
    if isinstance(found, bytes):  # fsspec returns bare bytes for a single path
        found = {keys[0]: found}
    depth = len(shape) + 1  # "c" and one component per dimension
    by_key = {"/".join(str(path).split("/")[-depth:]): bytes(data) for path, data in found.items()}
    return {key: by_key[key] for key in relative if key in by_key}


def chunks_sha256(objects: Mapping[str, bytes]) -> str:
    """SHA-256 (hex) over chunk objects keyed by their path inside the array: for each key in
    sorted order, ``"<key>\\n<length>\\n"`` (UTF-8) then the object's bytes. Independent of
    where the archive lives; a changed, added, missing or truncated object changes it."""
    digest = hashlib.sha256()
    for key in sorted(objects):
        data = objects[key]
        digest.update(f"{key}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def pixels_sha256(pixels: np.ndarray) -> str:
    """SHA-256 (hex) of decoded pixels: their little-endian bytes in C order (shape and dtype
    are checked separately)."""
    values = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    return hashlib.sha256(values.tobytes()).hexdigest()


def check_objects(objects: Mapping[str, bytes], metadata: dict[str, Any]) -> dict[str, str]:
    """Chunk streams that do not parse or fail their checksums (shard index, stream header,
    per-tile CRC-32): object key -> what is wrong. Parses only; nothing is decoded."""
    sharding = _sharding(metadata)
    outer = _outer_chunk_shape(metadata)
    problems: dict[str, str] = {}
    for key, data in objects.items():
        try:
            if sharding:
                _check_shard_index(data, outer, sharding)
            for stream in _inner_chunks(data, outer, sharding) if sharding else iter([data]):
                _check_stream(stream)
        except BitstreamError as error:
            problems[key] = str(error)
    return problems


def array_from_objects(metadata_json: bytes, objects: Mapping[str, bytes]) -> zarr.Array:
    """A read-only zarr array over an array's zarr.json and chunk objects held in memory (as
    :func:`chunk_objects` read them): decoding it decodes exactly the bytes that were hashed."""
    store = {"zarr.json": cpu.Buffer.from_bytes(metadata_json)}
    store.update({key: cpu.Buffer.from_bytes(data) for key, data in objects.items()})
    memory = zarr.storage.MemoryStore(store, read_only=True)  # type: ignore[arg-type]
    return zarr.open_array(memory, mode="r")


def _outer_chunk_shape(metadata: dict[str, Any]) -> list[int]:
    return [int(side) for side in metadata["chunk_grid"]["configuration"]["chunk_shape"]]


def _sharding(metadata: dict[str, Any]) -> dict[str, Any] | None:
    codecs = metadata["codecs"]
    return codecs[0]["configuration"] if codecs[0]["name"] == "sharding_indexed" else None


def _check_shard_index(data: bytes, shard: list[int], config: dict[str, Any]) -> None:
    inner = [int(side) for side in config["chunk_shape"]]
    count = math.prod(math.ceil(s / c) for s, c in zip(shard, inner, strict=True))
    size = 16 * count + _CRC_BYTES
    if len(data) < size:
        raise BitstreamError("shard shorter than its index")
    index = data[len(data) - size : len(data) - _CRC_BYTES]
    (stored,) = struct.unpack_from("<I", data, len(data) - _CRC_BYTES)
    if google_crc32c.value(index) != stored:
        raise BitstreamError("shard index checksum mismatch (corrupt shard)")
    entries = struct.unpack(f"<{2 * count}Q", index)
    for offset, length in zip(entries[0::2], entries[1::2], strict=True):
        if (offset, length) != (_EMPTY, _EMPTY) and offset + length > len(data) - size:
            raise BitstreamError("shard index points past the shard's chunks (truncated shard)")


def _check_stream(chunk: bytes) -> None:
    """A chunk stream's envelope and Radiarc stream parse and pass their checksums."""
    _, stream = parse_envelope(chunk)
    if stream:
        bitstream.unpack(stream)


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
    _, stream = parse_envelope(chunk)
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


def encode_images_chunks(
    images: Sequence[tuple[ChunkSettings, list[tuple[ChunkIndex, np.ndarray]]]],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[dict[ChunkIndex, bytes]]:
    """The chunk streams of several images, each given as its codec settings and its
    :func:`chunk_arrays`: every chunk through the network in shared batched calls, and under a
    bpp target each image's chunks sharing that image's budget (codec.chunk.encode_chunks)."""
    arrays = [chunk for _, chunks in images for _, chunk in chunks]
    configs = [config for config, chunks in images for _ in chunks]
    owners = [number for number, (_, chunks) in enumerate(images) for _ in chunks]
    streams = iter(encode_chunks(arrays, configs, batch_size, owners))
    return [{index: next(streams).data for index, _ in chunks} for _, chunks in images]


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
