"""The Radiarc stream container: bytes in, bytes out; no tensors and no model here.

Layout of format version 1 (all integers little-endian; documented in docs/bitstream.md):

    magic            4 bytes  b"RDRC"
    version          u8       1, or 2 when segments carry block stops
    model id         u8 length + ASCII
    weights hash     8 bytes  first 8 bytes of the weights file's SHA-256
    height, width    u32, u32
    bits stored      u8       8..16
    tile size        u16      tiles are tile_size x tile_size, row-major, edges smaller
    code channels    u8       bits per code position per iteration
    per tile         u8 iteration count, LEB128 length of each iteration's segment,
                     u32 CRC-32 of the tile's segments
    header CRC-32    u32      over everything above
    payload          for each tile, its segments in iteration order

Format version 2 is the same container whose segments also say which 16x16 blocks are still
being refined (spatially adaptive rate, see codec/entropy.py): ``block_stops`` in the header.

Format version 3 is written when some tiles are coded at half resolution (codec/resolution.py):
a flags byte follows the version (bit 0: block stops), and each tile's table entry starts with
a u8 mode, 0 for full resolution and 1 for half. Versions 1 and 2 stay as they were, so every
stream written before version 3 existed reads the same.

Format version 4 is version 3 with a residual layer (codec/residual.py): each tile's table entry
also holds, after its segment lengths, the LEB128 length of its residual segment (0: none), the
LEB128 largest pixel error the layer allows and the u32 CRC-32 of the tile's pixels as the
encoder decoded them (a reader whose network arithmetic differs finds out instead of returning
pixels off the bound); the residual segment follows the tile's iteration segments and is under
the tile's checksum.

Format version 5 is version 4 whose residual segments are written by the residual layer's
coder 2 (cubic, edge-following interpolation; contexts with error energy; the bit below each
leading one range-coded: 0.7-5.4% smaller lossless; and layers a bpp target may smooth).
Version 4 streams keep decoding with coder 1.

Format version 6 is version 5 with a coarse correction per tile (codec/coarse.py: the network's
low-frequency error as block means, added back bilinearly): each tile's table entry holds the
LEB128 length of its coarse segment (0: none) just before its residual length, the segment
follows the iteration segments (before the residual segment, under the tile's checksum), and
the pixel checksum covers any tile with a correction or a layer. Streams with no correction
stay version 5 or older.

Any prefix of a tile's iterations is a valid coarser stream (:func:`keep_iterations` rewrites
the table), and each tile can be checked and decoded without the others.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

MAGIC = b"RDRC"
FORMAT_VERSION = 1  # streams whose every block is coded at every iteration
BLOCK_STOPS_VERSION = 2  # segments carry which blocks are still refined
TILE_MODES_VERSION = 3  # a flags byte, and a mode (full or half resolution) per tile
RESIDUAL_VERSION = 4  # version 3, and a residual layer per tile (residual coder 1)
RESIDUAL_CODER_2_VERSION = 5  # version 4 whose residual segments use coder 2
COARSE_VERSION = 6  # version 5, and a coarse correction per tile
KNOWN_VERSIONS = (
    FORMAT_VERSION,
    BLOCK_STOPS_VERSION,
    TILE_MODES_VERSION,
    RESIDUAL_VERSION,
    RESIDUAL_CODER_2_VERSION,
    COARSE_VERSION,
)
#: The residual coder (codec/residual.py) of each version that has residual layers.
RESIDUAL_CODERS = {RESIDUAL_VERSION: 1, RESIDUAL_CODER_2_VERSION: 2, COARSE_VERSION: 2}
#: The version a stream with residual layers and no coarse corrections is written as, per coder.
LAYER_VERSIONS = {1: RESIDUAL_VERSION, 2: RESIDUAL_CODER_2_VERSION}
BLOCK_STOPS_FLAG = 1  # version 3 flags, bit 0
FULL_RESOLUTION, HALF_RESOLUTION = 0, 1  # version 3 tile modes
HASH_BYTES = 8
MAX_SIDE = 1 << 16  # larger than any radiograph; bounds memory for hostile headers
#: Most pixels a stream may declare (128 Mi, 256 MiB of 16-bit pixels): detector radiographs are
#: at most ~25 Mpx, and a hostile header must not make a decoder allocate gigabytes.
MAX_PIXELS = 1 << 27
MAX_TILE = 1 << 15  # the header stores the tile side in 16 bits
_FIXED = struct.Struct("<IIBHB")


class BitstreamError(ValueError):
    """A stream that is truncated, corrupt, foreign, of an unknown version or model."""


@dataclass(frozen=True)
class StreamHeader:
    model_id: str
    weights_hash: bytes
    height: int
    width: int
    bits_stored: int
    tile_size: int
    code_channels: int
    block_stops: bool = False  # format 2: blocks may stop refining before their tile does

    def __post_init__(self) -> None:
        if not (0 < self.height <= MAX_SIDE and 0 < self.width <= MAX_SIDE):
            raise BitstreamError(f"image size {self.height}x{self.width} out of range")
        if self.height * self.width > MAX_PIXELS:
            raise BitstreamError(f"image size {self.height}x{self.width} over {MAX_PIXELS} pixels")
        if not 8 <= self.bits_stored <= 16:
            raise BitstreamError(f"bits stored {self.bits_stored} out of range 8..16")
        if not 16 <= self.tile_size <= MAX_TILE or self.tile_size % 16:
            raise BitstreamError(
                f"tile size {self.tile_size} is not a multiple of 16 in 16..{MAX_TILE}"
            )
        if len(self.weights_hash) != HASH_BYTES:
            raise BitstreamError("weights hash must be 8 bytes")
        if not 0 < len(self.model_id) < 256 or not self.model_id.isascii():
            raise BitstreamError("model id must be 1..255 ASCII characters")

    @property
    def tile_grid(self) -> tuple[int, int]:
        return (-(-self.height // self.tile_size), -(-self.width // self.tile_size))

    @property
    def tile_count(self) -> int:
        rows, cols = self.tile_grid
        return rows * cols


@dataclass(frozen=True)
class Stream:
    """A header and, per tile (row-major), the entropy-coded segment of each iteration, which
    tiles are coded at half resolution (empty: none is), and each tile's residual layer and the
    largest pixel error it allows (empty: no tile has one; ``b""``: this tile has none), and
    each tile's coarse correction (the same convention; a stream with any needs the residual
    fields too, for the pixel checksums)."""

    header: StreamHeader
    tiles: list[list[bytes]] = field(default_factory=list)
    half_res: list[bool] = field(default_factory=list)
    residuals: list[bytes] = field(default_factory=list)
    max_errors: list[int] = field(default_factory=list)
    pixel_crcs: list[int] = field(default_factory=list)  # CRC-32 of each layered tile's pixels
    residual_coder: int = 2  # which coder wrote the residual segments (codec/residual.py)
    coarse: list[bytes] = field(default_factory=list)  # coarse segments (codec/coarse.py)

    def iterations(self) -> list[int]:
        return [len(segments) for segments in self.tiles]

    def is_half_res(self, tile: int) -> bool:
        return bool(self.half_res) and self.half_res[tile]

    def residual(self, tile: int) -> tuple[bytes, int, int] | None:
        """The tile's residual segment, the error it allows and the CRC-32 of the pixels it
        decodes to, if it has one."""
        if not self.residuals or not self.residuals[tile]:
            return None
        return self.residuals[tile], self.max_errors[tile], self.pixel_crcs[tile]

    def coarse_segment(self, tile: int) -> bytes | None:
        """The tile's coarse correction segment, if it has one."""
        if not self.coarse or not self.coarse[tile]:
            return None
        return self.coarse[tile]

    def checks_pixels(self, tile: int) -> bool:
        """Whether the tile's pixel checksum is written: it has a correction or a layer."""
        return self.residual(tile) is not None or self.coarse_segment(tile) is not None


def leb128(value: int) -> bytes:
    """``value`` as unsigned LEB128: 7 bits per byte, high bit set on all but the last."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pixels_crc(pixels: np.ndarray) -> int:
    """CRC-32 of a tile's pixels as little-endian bytes of their dtype (uint8 or uint16)."""
    return zlib.crc32(np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes())


def leb128_size(value: int) -> int:
    """Bytes :func:`leb128` takes for ``value``."""
    return max(1, -(-value.bit_length() // 7))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            raise BitstreamError(f"stream truncated while reading {what}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def leb128(self, what: str) -> int:
        value = 0
        for shift in range(0, 35, 7):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise BitstreamError(f"malformed length while reading {what}")


def format_version(stream: Stream) -> int:
    """The version :func:`pack` writes ``stream`` as: the oldest that can hold it."""
    if any(stream.coarse):
        if stream.residual_coder != RESIDUAL_CODERS[COARSE_VERSION]:
            raise ValueError(f"format {COARSE_VERSION} holds residual coder 2 only")
        return COARSE_VERSION
    if any(stream.residuals):
        if stream.residual_coder not in LAYER_VERSIONS:
            raise ValueError(f"no stream format holds residual coder {stream.residual_coder}")
        return LAYER_VERSIONS[stream.residual_coder]
    if any(stream.half_res):
        return TILE_MODES_VERSION
    return BLOCK_STOPS_VERSION if stream.header.block_stops else FORMAT_VERSION


def pack(stream: Stream) -> bytes:
    header = stream.header
    if len(stream.tiles) != header.tile_count:
        raise ValueError(f"{len(stream.tiles)} tiles for a grid of {header.tile_count}")
    if stream.half_res and len(stream.half_res) != header.tile_count:
        raise ValueError(f"{len(stream.half_res)} tile modes for a grid of {header.tile_count}")
    counts = {len(stream.tiles), len(stream.residuals), len(stream.max_errors)}
    if stream.residuals and len(counts | {len(stream.pixel_crcs)}) > 1:
        raise ValueError("need one residual segment, max error and pixel CRC per tile")
    if stream.coarse and (len(stream.coarse) != len(stream.tiles) or not stream.residuals):
        raise ValueError("need one coarse segment per tile, and the residual fields")
    version = format_version(stream)  # the oldest that holds it: older readers read those
    tile_modes = version >= TILE_MODES_VERSION
    residuals = version in RESIDUAL_CODERS
    out = bytearray(MAGIC)
    out.append(version)
    if tile_modes:
        out.append(BLOCK_STOPS_FLAG if header.block_stops else 0)
    model_id = header.model_id.encode("ascii")
    out += bytes([len(model_id)]) + model_id + header.weights_hash
    out += _FIXED.pack(
        header.height, header.width, header.bits_stored, header.tile_size, header.code_channels
    )
    for index, segments in enumerate(stream.tiles):
        if len(segments) > 255:
            raise ValueError("at most 255 iterations per tile")
        if tile_modes:
            out.append(HALF_RESOLUTION if stream.is_half_res(index) else FULL_RESOLUTION)
        out.append(len(segments))
        for segment in segments:
            out += leb128(len(segment))
        if version == COARSE_VERSION:
            out += leb128(len(stream.coarse[index]))
        if residuals:
            out += leb128(len(stream.residuals[index])) + leb128(stream.max_errors[index])
            out += struct.pack("<I", stream.pixel_crcs[index])
        out += struct.pack("<I", zlib.crc32(_tile_payload(stream, index)))
    out += struct.pack("<I", zlib.crc32(out))
    for index in range(len(stream.tiles)):
        out += _tile_payload(stream, index)
    return bytes(out)


def _tile_payload(stream: Stream, tile: int) -> bytes:
    coarse = stream.coarse[tile] if stream.coarse else b""
    return (
        b"".join(stream.tiles[tile])
        + coarse
        + (stream.residuals[tile] if stream.residuals else b"")
    )


@dataclass(frozen=True)
class _TileEntry:
    lengths: list[int]
    crc: int
    half_res: bool
    residual_length: int = 0
    max_error: int = 0
    pixel_crc: int = 0
    coarse_length: int = 0

    @property
    def payload(self) -> int:
        """Bytes of the tile's payload."""
        return sum(self.lengths) + self.coarse_length + self.residual_length


def _read_header(reader: _Reader) -> tuple[StreamHeader, list[_TileEntry], int]:
    """The header, the tile table and the format version."""
    if reader.take(4, "magic") != MAGIC:
        raise BitstreamError("not a Radiarc stream (bad magic bytes)")
    version = reader.take(1, "version")[0]
    if version not in KNOWN_VERSIONS:
        known = ", ".join(str(v) for v in KNOWN_VERSIONS)
        raise BitstreamError(f"unknown stream format version {version} (this reads {known})")
    block_stops = version == BLOCK_STOPS_VERSION
    if version >= TILE_MODES_VERSION:
        flags = reader.take(1, "format flags")[0]
        if flags & ~BLOCK_STOPS_FLAG:
            raise BitstreamError(f"unknown format flags {flags:#04x}")
        block_stops = bool(flags & BLOCK_STOPS_FLAG)
    id_length = reader.take(1, "model id")[0]
    try:
        model_id = reader.take(id_length, "model id").decode("ascii")
    except UnicodeDecodeError as error:
        raise BitstreamError("model id is not ASCII") from error
    weights_hash = reader.take(HASH_BYTES, "weights hash")
    height, width, bits_stored, tile_size, channels = _FIXED.unpack(
        reader.take(_FIXED.size, "image geometry")
    )
    header = StreamHeader(
        model_id,
        weights_hash,
        height,
        width,
        bits_stored,
        tile_size,
        channels,
        block_stops=block_stops,
    )
    table = []
    for _ in range(header.tile_count):
        mode = FULL_RESOLUTION
        if version >= TILE_MODES_VERSION:
            mode = reader.take(1, "tile mode")[0]
            if mode not in (FULL_RESOLUTION, HALF_RESOLUTION):
                raise BitstreamError(f"unknown tile mode {mode}")
        count = reader.take(1, "tile table")[0]
        lengths = [reader.leb128("tile table") for _ in range(count)]
        residual_length = max_error = pixel_crc = coarse_length = 0
        if version == COARSE_VERSION:
            coarse_length = reader.leb128("coarse length")
        if version in RESIDUAL_CODERS:
            residual_length = reader.leb128("residual length")
            max_error = reader.leb128("residual max error")
            if max_error >= 1 << bits_stored:
                raise BitstreamError(f"residual max error {max_error} beyond {bits_stored} bits")
            (pixel_crc,) = struct.unpack("<I", reader.take(4, "pixel checksum"))
        (crc,) = struct.unpack("<I", reader.take(4, "tile checksum"))
        half = mode == HALF_RESOLUTION
        table.append(
            _TileEntry(lengths, crc, half, residual_length, max_error, pixel_crc, coarse_length)
        )
    (stored,) = struct.unpack("<I", reader.take(4, "header checksum"))
    if zlib.crc32(reader.data[: reader.offset - 4]) != stored:
        raise BitstreamError("header checksum mismatch (corrupt stream)")
    return header, table, version


def read_header(data: bytes) -> StreamHeader:
    """Parse and verify only the header (for ``radiarc info``)."""
    return _read_header(_Reader(data))[0]


def unpack(data: bytes, tiles: set[int] | None = None) -> Stream:
    """Parse a stream, verifying the checksums of the requested tiles (all by default).

    Tiles not requested come back with no segments, so a region decodes alone.
    """
    reader = _Reader(data)
    header, table, version = _read_header(reader)
    payload_size = sum(entry.payload for entry in table)
    if len(data) - reader.offset != payload_size:
        raise BitstreamError(
            f"payload is {len(data) - reader.offset} bytes, the tile table says {payload_size}"
        )
    decoded: list[list[bytes]] = []
    residuals: list[bytes] = []
    coarse: list[bytes] = []
    for index, entry in enumerate(table):
        raw = reader.take(entry.payload, f"tile {index}")
        if tiles is not None and index not in tiles:
            decoded.append([])
            residuals.append(b"")
            coarse.append(b"")
            continue
        if zlib.crc32(raw) != entry.crc:
            raise BitstreamError(f"tile {index} checksum mismatch (corrupt stream)")
        offsets = [0]
        for length in entry.lengths:
            offsets.append(offsets[-1] + length)
        decoded.append([raw[a:b] for a, b in itertools.pairwise(offsets)])
        coarse.append(raw[offsets[-1] : offsets[-1] + entry.coarse_length])
        residuals.append(raw[offsets[-1] + entry.coarse_length :])
    half_res = [entry.half_res for entry in table]
    if not any(entry.residual_length or entry.coarse_length for entry in table):
        return Stream(header, decoded, half_res if any(half_res) else [])
    max_errors = [entry.max_error for entry in table]
    crcs = [entry.pixel_crc for entry in table]
    half = half_res if any(half_res) else []
    has_coarse = version == COARSE_VERSION
    return Stream(
        header,
        decoded,
        half,
        residuals,
        max_errors,
        crcs,
        RESIDUAL_CODERS[version],
        coarse if has_coarse else [],
    )


def keep_iterations(data: bytes, iterations: int) -> bytes:
    """The lower-rate stream made of each tile's first ``iterations`` segments. A tile keeps
    its residual layer and coarse correction only if it keeps all its iterations: they
    correct those."""
    if iterations < 1:
        raise ValueError("keep at least one iteration")
    stream = unpack(data)
    kept = [segments[:iterations] for segments in stream.tiles]

    def still_correcting(corrections: list[bytes]) -> list[bytes]:
        """Per tile, its correction if it keeps all its iterations, else none."""
        if not corrections:
            return [b""] * len(stream.tiles)
        whole = [len(segments) <= iterations for segments in stream.tiles]
        return [c if keeps else b"" for c, keeps in zip(corrections, whole, strict=True)]

    residuals = still_correcting(stream.residuals)
    coarse = still_correcting(stream.coarse)
    if not any(residuals) and not any(coarse):
        return pack(Stream(stream.header, kept, stream.half_res))
    return pack(
        replace(stream, tiles=kept, residuals=residuals, coarse=coarse if any(coarse) else [])
    )
