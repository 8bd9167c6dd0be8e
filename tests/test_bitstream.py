"""The stream container: round trips, progressive prefixes, and refusal of bad bytes."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec import bitstream
from codec.bitstream import BitstreamError, Stream, StreamHeader

HEADER = StreamHeader("rnnconv-pool-v1", bytes(range(8)), 700, 1100, 12, 512, 32)


def sample_stream() -> Stream:
    tiles = [[bytes([t, k]) * (10 + 100 * k) for k in range(1 + t % 3)] for t in range(6)]
    return Stream(HEADER, tiles)


def test_round_trip_keeps_header_and_segments() -> None:
    stream = sample_stream()
    parsed = bitstream.unpack(bitstream.pack(stream))
    assert parsed == stream
    assert HEADER.tile_grid == (2, 3)


def test_format_2_says_blocks_stop_and_keeps_it_through_a_prefix() -> None:
    stream = Stream(dataclasses.replace(HEADER, block_stops=True), sample_stream().tiles)
    data = bitstream.pack(stream)
    assert data[4] == bitstream.BLOCK_STOPS_VERSION
    assert bitstream.unpack(data) == stream
    assert bitstream.read_header(bitstream.keep_iterations(data, 1)).block_stops
    assert bitstream.pack(sample_stream())[4] == bitstream.FORMAT_VERSION  # unchanged format 1


def test_prefix_of_iterations_is_a_valid_smaller_stream() -> None:
    data = bitstream.pack(sample_stream())
    smaller = bitstream.keep_iterations(data, 1)
    parsed = bitstream.unpack(smaller)
    assert parsed.iterations() == [1] * 6
    assert [s[0] for s in parsed.tiles] == [s[0] for s in sample_stream().tiles]
    assert len(smaller) < len(data)


def test_unrequested_tiles_are_not_read() -> None:
    data = bitstream.pack(sample_stream())
    parsed = bitstream.unpack(data, tiles={4})
    assert parsed.tiles[4] == sample_stream().tiles[4]
    assert all(not parsed.tiles[i] for i in range(6) if i != 4)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + bytes([9]) + d[5:], "version 9 .this reads 1, 2, 3"),
        (lambda d: d[:-1], "payload"),
        (lambda d: d[:30], "truncated"),
        (lambda d: d + b"\0", "payload"),
        (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "checksum"),
        (lambda d: d[:-5] + bytes([d[-5] ^ 0x10]) + d[-4:], "tile 5 checksum"),
    ],
)
def test_damaged_streams_raise_a_clear_error(mutate, message) -> None:  # type: ignore[no-untyped-def]
    data = bitstream.pack(sample_stream())
    with pytest.raises(BitstreamError, match=message):
        bitstream.unpack(mutate(data))


def test_header_fields_are_validated() -> None:
    with pytest.raises(BitstreamError, match="bits stored"):
        StreamHeader("m", bytes(8), 10, 10, 17, 512, 32)
    with pytest.raises(BitstreamError, match="tile size"):
        StreamHeader("m", bytes(8), 10, 10, 8, 500, 32)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(BitstreamError):
        bitstream.unpack(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_corruption_of_a_real_stream_is_detected(data: st.DataObject) -> None:
    packed = bytearray(bitstream.pack(sample_stream()))
    position = data.draw(st.integers(0, len(packed) - 1))
    packed[position] ^= data.draw(st.integers(1, 255))
    try:
        parsed = bitstream.unpack(bytes(packed))
    except BitstreamError:
        return
    # CRC-32 catches every single-byte error; reaching here would be silent garbage.
    pytest.fail(f"corruption at byte {position} went unnoticed: {parsed.header}")
