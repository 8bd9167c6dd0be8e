"""Fuzzing the code that meets untrusted bytes: the DICOM reader, UIDs that become archive
paths, and the codec's stream and chunk decoders (issue #7, docs/reliability.md).

    python -m storage.fuzz --minutes 5 [--seed 1] [--targets dicom,uid,stream,chunk]
                           [--out fuzz-failures] [--memory-gib 4] [--input-seconds 10]

Each target runs for ``--minutes`` in a worker process of its own, under an address-space
limit (``RLIMIT_AS``, 4 GiB by default), so that unbounded memory shows up as a
``MemoryError`` instead of a machine out of memory. Inputs come from Hypothesis strategies:
random bytes, and mutations (bit flips, byte and length-field overwrites, truncations,
insertions, deletions) of real inputs: the DICOM files of ``tests/data`` plus small synthetic
ones in every encoding the reader supports, and streams the codec really wrote. The codec
targets also *re-seal* mutated streams (mutate the parsed header or segments, then write them
back with valid checksums), so that mutations get past the CRCs and reach the decoders.

The properties are the ones ``tests/test_bad_inputs.py`` checks in CI, with fewer examples:

- ``dicom``: :func:`storage.dicom.read_dicom` returns an image within the pixel contract or
  raises :class:`storage.dicom.DicomError` naming the source, with no patient value in it and
  no ``MemoryError``/``RecursionError`` behind it; never another exception.
- ``uid``: :func:`storage.layout.instance_path` of hostile raw UID bytes gives three
  components of digits and dots of at most 64 characters (a relative path that stays in the
  archive) or :class:`storage.uids.UIDError` with a short, printable message.
- ``stream`` and ``chunk``: :func:`codec.bitstream.unpack` + :func:`codec.learned.decode_image`
  and :func:`codec.chunk.decode_chunk` return an image of the declared shape or raise
  :class:`codec.bitstream.BitstreamError`.

An input that breaks a property, raises anything else, runs past ``--input-seconds`` (a
``SIGALRM`` between bytecodes; the parent kills a worker stuck in native code for three times
that) or kills the worker is a failure: saved under ``--out/<target>/`` with a text file saying
what happened, at most three per distinct failure. The command prints the inputs tried and the
outcomes per target and exits 1 if anything failed. Hypothesis is the input generator here
(no shrinking: a failing input is saved as it is); ``atheris`` was not used.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from codec.io import GrayImage, peak_value
from storage.dicom import MAX_PIXELS, DicomError, read_dicom
from storage.layout import instance_path
from storage.phi import phi_values
from storage.uids import MAX_LENGTH, UIDError

__all__ = [
    "TARGETS",
    "PropertyViolation",
    "check_chunk",
    "check_dicom",
    "check_stream",
    "check_uid_path",
    "hostile_uid_bytes",
    "main",
    "mutated",
]

TARGETS = ("dicom", "uid", "stream", "chunk")
DATA_DIR = Path(__file__).resolve().parents[1] / "tests" / "data"
#: A format 4 stream (residual coder 1) as written before format 5: readers keep decoding it.
FORMAT_4_SEED = DATA_DIR.parent / "fixtures" / "residual-v4-d4.rdrc"
CORRECTED_SEED_IMAGE = DATA_DIR / "00004934_000.png"  # a real chest X-ray (tests/data)
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_COMPONENTS = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_SAFE_MESSAGE = re.compile(r"[ -~]*")  # printable ASCII
#: Values that make good length and dimension fields (little-endian on the way in).
INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)  # fmt: skip
_SAVED_PER_SIGNATURE = 3
_RESULT_EVERY_SECONDS = 5.0


class PropertyViolation(AssertionError):
    """An input that broke a property: wrong result, unclean error, leak, unbounded memory."""


# ------------------------------------------------------------------------- properties


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _no_resource_exhaustion(error: BaseException, what: str) -> None:
    for cause in _causes(error):
        if isinstance(cause, MemoryError | RecursionError):
            raise PropertyViolation(
                f"{type(cause).__name__} behind a {what}: {str(error)[:200]}"
            ) from error


def check_dicom(data: bytes, name: str = "fuzz-input", phi: Sequence[str] = ()) -> str:
    """``"decoded"`` or ``"refused"``; :class:`PropertyViolation` (or the unexpected
    exception itself) when :func:`read_dicom` misbehaves on ``data``."""
    try:
        result = read_dicom(data, name=name)
    except DicomError as error:
        text = str(error)
        if not text.startswith(f"{name}: ") or not error.reason:
            raise PropertyViolation(
                f"DicomError without source and reason: {text[:200]}"
            ) from error
        _no_resource_exhaustion(error, "DicomError")
        leaked = [value for value in phi if value in text]
        if leaked:
            raise PropertyViolation(f"a patient value is in the error: {text[:200]}") from error
        return "refused"
    pixels = result.image.pixels
    bits = result.image.bits_stored
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise PropertyViolation(f"decoded {pixels.dtype} pixels of shape {pixels.shape}")
    if not 0 < pixels.size <= MAX_PIXELS or not 8 <= bits <= 16:
        raise PropertyViolation(f"decoded {pixels.shape} pixels of {bits} bits")
    if int(pixels.max()) > peak_value(bits):
        raise PropertyViolation(f"a pixel above {peak_value(bits)} with {bits} bits stored")
    return "decoded"


def uid_header(values: Sequence[bytes]) -> Dataset:
    """A dataset holding ``values`` as raw Study / Series / SOP Instance UID bytes, as
    :func:`read_dicom` leaves them (pydicom converts nothing until asked)."""
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for keyword, raw in zip(UID_KEYWORDS, values, strict=True):
        tag = Tag(tag_for_keyword(keyword) or 0)
        elements[tag] = RawDataElement(tag, "UI", len(raw), raw, 0, False, True)
    return Dataset(elements)


def check_uid_path(values: Sequence[bytes], lenient: bool = False) -> str:
    """``"accepted"`` or ``"refused"``: what :func:`instance_path` makes of three raw UIDs.
    Accepted UIDs must be safe path components; refusals must say why, shortly and in
    printable ASCII (a hostile value must not reach a log)."""
    try:
        parts = instance_path(uid_header(values), lenient)
    except UIDError as error:
        text = str(error)
        if not text or len(text) > 200 or not _SAFE_MESSAGE.fullmatch(text):
            raise PropertyViolation(f"unsafe UIDError message {text[:200]!r}") from error
        if "/" in text or "\\" in text:
            raise PropertyViolation(f"UIDError quotes a path separator: {text[:200]!r}") from error
        return "refused"
    for part in parts:
        if not _COMPONENTS.fullmatch(part) or len(part) > MAX_LENGTH:
            raise PropertyViolation(f"unsafe path component {part[:100]!r}")
    path = "/".join(parts)
    if len(Path(path).parts) != 3 or Path(path).is_absolute():
        raise PropertyViolation(f"instance path {path!r} is not study/series/sop")
    return "accepted"


def check_stream(data: bytes, decode: bool = True) -> str:
    """``"unpacked"``/``"decoded"`` or ``"refused"``: a Radiarc stream through
    :func:`codec.bitstream.unpack` and (``decode``) :func:`codec.learned.decode_image`."""
    from codec import bitstream
    from codec.learned import decode_image

    try:
        stream = bitstream.unpack(data)
        if not decode:
            return "unpacked"
        image = decode_image(data)
    except bitstream.BitstreamError as error:
        _no_resource_exhaustion(error, "BitstreamError")
        return "refused"
    header = stream.header
    if image.pixels.shape != (header.height, header.width):
        raise PropertyViolation(f"decoded {image.pixels.shape}, header says {header}")
    if image.bits_stored != header.bits_stored:
        raise PropertyViolation("decoded bits stored differ from the header's")
    return "decoded"


def check_chunk(data: bytes) -> str:
    """``"decoded"`` or ``"refused"``: a chunk stream through :func:`codec.chunk.decode_chunk`."""
    from codec import bitstream
    from codec.chunk import decode_chunk

    try:
        chunk = decode_chunk(data)
    except bitstream.BitstreamError as error:
        _no_resource_exhaustion(error, "BitstreamError")
        return "refused"
    if chunk.ndim != 2 or chunk.dtype not in (np.uint8, np.uint16):
        raise PropertyViolation(f"decoded a {chunk.dtype} chunk of shape {chunk.shape}")
    return "decoded"


# ------------------------------------------------------------------------- strategies

_MUTATIONS = ("flip", "byte", "word", "short", "truncate", "insert", "delete", "duplicate")


@st.composite
def _mutation(draw: st.DrawFn, seeds: Sequence[bytes], max_steps: int) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_steps))):
        size = len(data)
        if size == 0:
            break
        # Half of the positions fall in the first 4 KiB, where headers and lengths live.
        head = min(size - 1, 4095)
        where = draw(st.integers(0, head) | st.integers(0, size - 1))
        kind = draw(st.sampled_from(_MUTATIONS))
        if kind == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[where] = draw(st.integers(0, 255))
        elif kind in ("word", "short"):
            width = 4 if kind == "word" else 2
            value = draw(st.sampled_from(INTERESTING)) & ((1 << 8 * width) - 1)
            data[where : where + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            del data[where:]
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 256))]
        else:  # duplicate a slice in place: repeated elements, items, segments
            length = draw(st.integers(1, 512))
            data[where:where] = data[where : where + length]
    return bytes(data)


def mutated(seeds: Sequence[bytes], max_steps: int = 3) -> st.SearchStrategy[bytes]:
    """Bytes of one of ``seeds`` after 1 to ``max_steps`` random mutations."""
    return _mutation(list(seeds), max_steps)


def hostile_uid_bytes() -> st.SearchStrategy[bytes]:
    """Raw UID values: valid ones, near misses (separators, dots, NUL, padding, long), any
    text, any bytes."""
    near = st.lists(
        st.sampled_from(["1", "2", "0", "01", "999", ".", "..", "/", "\\", "\x00", " ", "a"]),
        max_size=40,
    ).map("".join)
    return st.one_of(
        st.from_regex(r"[1-9][0-9]{0,3}(\.[1-9][0-9]{0,5}){1,8}", fullmatch=True),
        near,
        st.text(max_size=120),
        st.integers(60, 300).map(lambda n: "1." + "2" * (n - 2)),
    ).map(lambda text: text.encode("utf-8", "surrogatepass")) | st.binary(max_size=120)


# ------------------------------------------------------------------------- seeds


def dicom_seeds(data_dir: Path | None = DATA_DIR) -> list[tuple[str, bytes]]:
    """The real DICOM files of ``data_dir`` plus small synthetic files: 8-bit, 12-bit,
    preamble-less ACR-NEMA, deflated, RLE and (when an encoder is installed) JPEG 2000."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
    )

    from storage.synth import Patient, dicom_bytes, synthetic_dicom

    seeds: list[tuple[str, bytes]] = []
    if data_dir is not None and data_dir.is_dir():
        seeds += [(path.name, path.read_bytes()) for path in sorted(data_dir.glob("*.dcm"))]
    rng = np.random.default_rng(7)
    ramp = np.add.outer(np.arange(40), np.arange(48)).astype(np.uint16)
    eight = GrayImage((ramp * 2 + rng.integers(0, 8, ramp.shape)).astype(np.uint8), 8)
    twelve = GrayImage((ramp * 40 + rng.integers(0, 64, ramp.shape)).astype(np.uint16), 12)
    patient = Patient("FUZZ^PATIENT^NAME", "FUZZ-ID-0001", "19610203")
    plain = synthetic_dicom(eight, "fuzz:8", patient=patient)
    deep = synthetic_dicom(twelve, "fuzz:12", patient=patient)
    seeds += [
        ("synthetic-8bit", dicom_bytes(plain)),
        ("synthetic-12bit", dicom_bytes(deep)),
        ("synthetic-acr-nema", dicom_bytes(synthetic_dicom(eight, "fuzz:acr"), acr_nema=True)),
    ]
    for label, syntax in (
        ("synthetic-deflated", DeflatedExplicitVRLittleEndian),
        ("synthetic-rle", RLELossless),
        ("synthetic-j2k", JPEG2000Lossless),
    ):
        dataset = synthetic_dicom(twelve, f"fuzz:{label}", patient=patient)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax.is_compressed else syntax
        dataset.file_meta = meta
        buffer = io.BytesIO()
        try:
            if syntax.is_compressed:
                dataset.compress(syntax)
            pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
        except Exception:  # no encoder installed for it: fuzz the others
            continue
        seeds.append((label, buffer.getvalue()))
    return seeds


def seed_phi(seeds: Sequence[tuple[str, bytes]]) -> list[str]:
    """Patient values of the seed files (4 characters or more: shorter ones are common)."""
    import pydicom

    values: set[str] = set()
    for _, data in seeds:
        try:
            header = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        except Exception:
            continue
        values.update(value for value in phi_values(header) if len(value) >= 4)
    return sorted(values)


def codec_seeds() -> tuple[list[bytes], list[bytes]]:
    """Real Radiarc streams and chunk streams written by the installed model (8 and 12 bits,
    several tiles, an edge chunk with padding, a flat chunk)."""
    import torch

    from codec.chunk import ChunkSettings, encode_chunk
    from codec.learned import AdaptiveCandidates, encode_image
    from codec.rate import RateControl

    torch.set_num_threads(1)
    rng = np.random.default_rng(11)
    ramp = np.add.outer(np.arange(40), np.arange(56)).astype(np.int64)
    eight = GrayImage((ramp * 2 + rng.integers(0, 16, ramp.shape)).astype(np.uint8), 8)
    twelve = GrayImage((ramp * 40 + rng.integers(0, 256, ramp.shape)).astype(np.uint16), 12)
    streams = [
        encode_image(eight, RateControl(iterations=2), tile_size=32).data,
        encode_image(twelve, RateControl(iterations=3), tile_size=32).data,
        # Format 5: a residual layer per tile (near-lossless).
        encode_image(twelve, RateControl(max_error=3), tile_size=32).data,
        *([FORMAT_4_SEED.read_bytes()] if FORMAT_4_SEED.exists() else []),
        *_coarse_seed(),
        # Format 2 (last: tests take it as such): blocks that stop refining.
        AdaptiveCandidates(twelve, tile_size=32).select(1.5).data,
    ]
    padded = np.zeros((32, 32), dtype=np.uint8)
    padded[:20, :24] = eight.pixels[:20, :24]
    chunks = [
        encode_chunk(eight.pixels[:32, :32], ChunkSettings.create(iterations=2)),
        encode_chunk(padded, ChunkSettings.create(iterations=1)),
        encode_chunk(twelve.pixels[:32, :32], ChunkSettings.create(iterations=2, bits_stored=12)),
        encode_chunk(np.full((32, 32), 9, dtype=np.uint8), ChunkSettings.create(iterations=1)),
    ]
    return streams, chunks


def _coarse_seed() -> list[bytes]:
    """Format 6: a 128x128 crop of a real radiograph at 0.3 bpp, where rate control gives
    some tiles a coarse correction (none when the sample is missing)."""
    from codec.io import read_png
    from codec.near_lossless import ResidualCandidates

    if not CORRECTED_SEED_IMAGE.exists():
        return []
    pixels = read_png(CORRECTED_SEED_IMAGE).pixels[600:728, 200:328]
    crop = GrayImage(np.ascontiguousarray(pixels), 8)
    return [ResidualCandidates.for_bpp(crop, tile_size=64).at_bpp(0.3).data]


@st.composite
def resealed_streams(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A real stream with a header field or segments changed and every checksum made valid
    again, so that the change reaches the decoder instead of the CRC check."""
    from codec import bitstream

    stream = bitstream.unpack(draw(st.sampled_from(list(seeds))))
    header = stream.header
    fields: dict[str, Any] = {
        "model_id": header.model_id,
        "weights_hash": header.weights_hash,
        "height": header.height,
        "width": header.width,
        "bits_stored": header.bits_stored,
        "tile_size": header.tile_size,
        "code_channels": header.code_channels,
        "block_stops": header.block_stops,
    }
    tiles = [list(segments) for segments in stream.tiles]
    residuals, max_errors = list(stream.residuals), list(stream.max_errors)
    coarse = list(stream.coarse)
    kinds = ["geometry", "bits", "channels", "segment", "iterations", "format"]
    kinds += ["residual", "max error"] if residuals else []
    what = draw(st.sampled_from(kinds + (["coarse"] if coarse else [])))
    if what == "geometry":
        side = st.integers(1, 96) | st.sampled_from([1, 15, 16, 17, 4096, bitstream.MAX_SIDE])
        fields["height"], fields["width"] = draw(side), draw(side)
        fields["tile_size"] = draw(st.sampled_from([16, 32, 48, 64, 4096, 65520]))
    elif what == "bits":
        fields["bits_stored"] = draw(st.integers(8, 16))
    elif what == "channels":
        fields["code_channels"] = draw(st.integers(0, 255))
    elif what == "format":  # format 1 segments read as format 2, and the reverse
        fields["block_stops"] = not header.block_stops
    elif what == "segment":
        tile = draw(st.integers(0, len(tiles) - 1))
        if tiles[tile]:
            k = draw(st.integers(0, len(tiles[tile]) - 1))
            tiles[tile][k] = draw(mutated([tiles[tile][k] or b"\0"]) | st.binary(max_size=300))
    elif what == "residual":
        tile = draw(st.integers(0, len(tiles) - 1))
        residuals[tile] = draw(mutated([residuals[tile] or b"\0"]) | st.binary(max_size=300))
    elif what == "coarse":
        tile = draw(st.integers(0, len(tiles) - 1))
        coarse[tile] = draw(mutated([coarse[tile] or b"\3\1"]) | st.binary(max_size=300))
    elif what == "max error":
        max_errors[draw(st.integers(0, len(tiles) - 1))] = draw(st.integers(0, 1 << 16))
    else:
        tile = draw(st.integers(0, len(tiles) - 1))
        count = draw(st.integers(0, 20))
        pool = [segment for segments in tiles for segment in segments] or [b""]
        tiles[tile] = [pool[i % len(pool)] for i in range(count)]
    try:
        new_header = bitstream.StreamHeader(**fields)
        if new_header.tile_count > 256:  # many small tiles: only slow, legitimate work
            return bitstream.pack(stream)
        grid = [tiles[i % len(tiles)] for i in range(new_header.tile_count)]
        if residuals and new_header.tile_count == len(tiles):
            layered = bitstream.Stream(
                new_header,
                grid,
                [],
                residuals,
                max_errors,
                list(stream.pixel_crcs),
                stream.residual_coder,
                coarse,
            )
            return bitstream.pack(layered)
        return bitstream.pack(bitstream.Stream(new_header, grid))
    except (ValueError, struct.error):  # outside what the format can hold: the original
        return bitstream.pack(stream)


@st.composite
def resealed_chunks(draw: st.DrawFn, chunks: Sequence[bytes], streams: Sequence[bytes]) -> bytes:
    """A chunk envelope with any field changed around a resealed stream (or none)."""
    from codec.chunk import MAGIC, VERSION

    original = draw(st.sampled_from(list(chunks)))
    _, _, rows, cols, itemsize, value = struct.unpack_from("<4sBIIBH", original)
    side = st.integers(1, 96) | st.sampled_from([0, 1, 4096, 65536, 65537, 2**32 - 1])
    rows = draw(st.just(rows) | side)
    cols = draw(st.just(cols) | side)
    itemsize = draw(st.just(itemsize) | st.integers(0, 3))
    value = draw(st.just(value) | st.integers(0, 0xFFFF))
    body = draw(st.just(original[17:]) | st.just(b"") | resealed_streams(streams))
    return struct.pack("<4sBIIBH", MAGIC, VERSION, rows, cols, itemsize, value) + body


# ------------------------------------------------------------------------- targets


@dataclass
class Target:
    """What one fuzz target feeds (a strategy) and checks (a property of one input)."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], str]
    to_bytes: Callable[[Any], bytes] = field(default=lambda value: bytes(value))


def build_target(name: str, data_dir: Path | None) -> Target:
    if name == "dicom":
        seeds = dicom_seeds(data_dir)
        phi = seed_phi(seeds)
        files = [data for _, data in seeds]
        preamble = b"\0" * 128 + b"DICM"
        strategy = st.one_of(
            mutated(files),
            mutated(files, max_steps=12),
            st.binary(max_size=2048),
            st.binary(max_size=2048).map(lambda tail: preamble + tail),
        )
        return Target(name, strategy, lambda data: check_dicom(data, phi=phi))
    if name == "uid":
        triple = st.tuples(hostile_uid_bytes(), hostile_uid_bytes(), hostile_uid_bytes())
        return Target(
            name,
            st.tuples(triple, st.booleans()),
            lambda value: check_uid_path(value[0], value[1]),
            lambda value: json.dumps([[v.hex() for v in value[0]], value[1]]).encode(),
        )
    streams, chunks = codec_seeds()
    if name == "stream":
        strategy = st.one_of(
            st.binary(max_size=1024),
            mutated(streams),
            resealed_streams(streams),
            resealed_streams(streams),
        )
        return Target(name, strategy, check_stream)
    if name == "chunk":
        strategy = st.one_of(
            st.binary(max_size=1024),
            mutated(chunks),
            resealed_chunks(chunks, streams),
            resealed_chunks(chunks, streams),
        )
        return Target(name, strategy, check_chunk)
    raise ValueError(f"unknown fuzz target {name!r}; choose from {', '.join(TARGETS)}")


# ------------------------------------------------------------------------- the worker


class _TimeUp(BaseException):
    """The target's minutes are over (a BaseException: Hypothesis lets it through)."""


class _InputTimeout(BaseException):
    """One input ran past ``--input-seconds`` (a BaseException: no ``except Exception`` in
    the code under test can swallow it)."""


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise _InputTimeout()


@dataclass
class _Tally:
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    saved: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "outcomes": dict(self.outcomes),
            "failures": dict(self.failures),
            "saved": self.saved,
        }


def _signature(error: BaseException) -> str:
    text = re.sub(r"\d+", "N", str(error).splitlines()[0] if str(error) else "")[:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _save(folder: Path, tally: _Tally, signature: str, data: bytes, details: str) -> None:
    tally.failures[signature] += 1
    if tally.failures[signature] > _SAVED_PER_SIGNATURE:
        return
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = folder / f"failure-{digest}.bin"
    if path.exists():  # the same input again (Hypothesis repeats simple examples)
        return
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{signature}\n\n{details}\n")
    tally.saved.append(str(path))


def run_worker(
    name: str, seconds: float, seed: int, out: Path, input_seconds: float, data_dir: Path | None
) -> int:
    """Fuzz ``name`` for ``seconds`` in this process; counts go to ``out/<name>/result.json``
    (rewritten every few seconds, so a worker killed by the parent still leaves them)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")  # pydicom warns (and logs) about every damaged header
    logging.disable(logging.CRITICAL)
    target = build_target(name, data_dir)
    tally = _Tally()
    current = os.open(folder / "current-input.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    result_path = folder / f"result-{seed}.json"
    stop_at = time.monotonic() + seconds
    last_write = 0.0
    signal.signal(signal.SIGALRM, _on_alarm)

    def write_result() -> None:
        temporary = result_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(tally.to_json()))
        temporary.replace(result_path)

    def one(value: Any) -> None:
        nonlocal last_write
        now = time.monotonic()
        if now >= stop_at:
            raise _TimeUp()
        if now - last_write >= _RESULT_EVERY_SECONDS:
            write_result()
            last_write = now
        data = target.to_bytes(value)
        os.ftruncate(current, 0)
        os.pwrite(current, data, 0)  # also the heartbeat the parent watches
        tally.inputs += 1
        signal.setitimer(signal.ITIMER_REAL, input_seconds)
        try:
            tally.outcomes[target.check(value)] += 1
        except _InputTimeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _save(folder, tally, f"timeout: over {input_seconds:g} s", data, "")
        except (KeyboardInterrupt, _TimeUp):
            raise
        except BaseException as error:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _save(folder, tally, _signature(error), data, traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    batch = 0
    while time.monotonic() < stop_at:
        runner = settings(
            max_examples=1000,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )(given(target.strategy)(one))
        try:
            hypothesis_seed(seed * 1_000_003 + batch)(runner)()
        except _TimeUp:
            break
        batch += 1
    write_result()
    os.close(current)
    return 0


# ------------------------------------------------------------------------- the parent


@dataclass
class _Run:
    target: str
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    saved: list[str] = field(default_factory=list)
    seconds: float = 0.0
    restarts: int = 0

    def add(self, result: dict[str, Any]) -> None:
        self.inputs += int(result["inputs"])
        self.outcomes.update(result["outcomes"])
        self.failures.update(result["failures"])
        self.saved += list(result["saved"])


def _limit_memory(gib: float) -> None:
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _supervise(args: argparse.Namespace, name: str) -> _Run:
    """Run workers for ``name`` until its minutes are spent: a worker that dies or stops
    beating (an input stuck in native code) is a failure, its input saved, and a fresh
    worker takes over with the next seed."""
    run = _Run(name)
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    budget = args.minutes * 60
    worker_seed = args.seed
    while (left := budget - (time.monotonic() - began)) > 1:
        command = [
            sys.executable, "-m", "storage.fuzz", "--worker", name, "--seed", str(worker_seed),
            "--seconds", f"{left:.1f}", "--out", str(args.out), "--memory-gib",
            str(args.memory_gib), "--input-seconds", str(args.input_seconds),
        ]  # fmt: skip
        if args.data_dir is not None:
            command += ["--data-dir", str(args.data_dir)]
        result_path = folder / f"result-{worker_seed}.json"
        result_path.unlink(missing_ok=True)
        child = subprocess.Popen(command)
        heartbeat = folder / "current-input.bin"
        started = time.monotonic()
        stuck = False
        while child.poll() is None:
            time.sleep(1.0)
            quiet = time.time() - heartbeat.stat().st_mtime if heartbeat.exists() else 0.0
            setup_over = time.monotonic() - started > 120
            if setup_over and quiet > max(3 * args.input_seconds, 30):
                stuck = True
                child.kill()
                child.wait()
        if result_path.exists():
            run.add(json.loads(result_path.read_text()))
        elif child.returncode != 0:  # it never reached the first input: a setup error
            run.failures[f"worker failed before its first input (exit {child.returncode})"] += 1
            break
        if stuck or child.returncode != 0:
            how = "stuck in native code" if stuck else f"worker exited with {child.returncode}"
            data = heartbeat.read_bytes() if heartbeat.exists() else b""
            tally = _Tally()
            _save(folder, tally, f"{how} (input saved)", data, "")
            run.failures.update(tally.failures)
            run.saved += tally.saved
            run.restarts += 1
            if run.restarts > 20:
                break
        else:
            break
        worker_seed += 7919
    run.seconds = time.monotonic() - began
    return run


def _print_report(runs: Sequence[_Run], args: argparse.Namespace) -> None:
    print(
        f"\nstorage.fuzz: {args.minutes:g} min per target, seed {args.seed}, "
        f"RLIMIT_AS {args.memory_gib:g} GiB, {args.input_seconds:g} s per input"
    )
    print(f"{'target':8} {'inputs':>9} {'per s':>7} {'failures':>8}  outcomes")
    for run in runs:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(run.outcomes.items()))
        rate = run.inputs / max(run.seconds, 1e-9)
        failures = sum(run.failures.values())
        print(f"{run.target:8} {run.inputs:9d} {rate:7.1f} {failures:8d}  {outcomes}")
    for run in runs:
        for signature, count in run.failures.most_common():
            print(f"  FAILURE {run.target}: {count} x {signature}")
    saved = [path for run in runs for path in run.saved]
    if saved:
        print(f"failing inputs saved under {args.out}/ ({len(saved)} files)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m storage.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=1.0, help="per target (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    parser.add_argument("--memory-gib", type=float, default=4.0, help="RLIMIT_AS per worker")
    parser.add_argument("--input-seconds", type=float, default=10.0, help="per-input limit")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once")
    parser.add_argument("--data-dir", type=Path, default=None, help="real DICOM seed files")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _limit_memory(args.memory_gib)
        data_dir = args.data_dir if args.data_dir is not None else DATA_DIR
        return run_worker(
            args.worker, args.seconds, args.seed, args.out, args.input_seconds, data_dir
        )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda name: _supervise(args, name), args.targets))
    else:
        runs = [_supervise(args, name) for name in args.targets]
    _print_report(runs, args)
    return 1 if any(run.failures for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
