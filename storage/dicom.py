"""Single-frame grayscale DICOM in, under the pixel contract of DESIGN.md.

:func:`read_dicom` reads a DICOM Part 10 file (with the 128-byte preamble and ``DICM``) or an
old preamble-less ACR-NEMA / implicit-VR file, from a path, ``bytes`` or a binary file-like
object (an fsspec/S3 stream works), and returns a :class:`DicomImage`: the raw stored pixel
values as a :class:`codec.io.GrayImage`, the photometric interpretation, the header without
pixel data and the transfer syntax.

Choices, so that every caller relies on the same behaviour:

- **Raw stored values.** MONOCHROME1 is *not* inverted; Rescale Slope/Intercept, Modality LUT
  and VOI LUT are *not* applied. They stay in :attr:`DicomImage.header` for display and export.
- **Bits stored** comes from (0028,0101) BitsStored and must be 8..16 (fewer than 8 is
  refused). BitsAllocated must be 8 or 16 and HighBit, when present, must be BitsStored - 1
  (values right-aligned); anything else is refused. Pixels come back as ``uint16``, or as
  ``uint8`` when BitsStored is 8.
- **High bits** above BitsStored are *masked off*, not refused: the standard says they are not
  part of the pixel value, and old files keep overlay planes or garbage there.
  :attr:`DicomImage.high_bits_masked` records whether any pixel had such bits set.
- **Signed pixel data** (PixelRepresentation = 1) is *refused* with a :class:`DicomError`.
  None of the sample radiographs is signed; shifting to unsigned would add an offset that every
  later stage (metrics, export) would have to carry, so it is left until a real archive needs it.
- Refused too: not DICOM, empty or truncated files, no pixel data, multi-frame
  (NumberOfFrames > 1), colour (SamplesPerPixel != 1 or photometric not MONOCHROME1/2), float
  pixel data, a compressed transfer syntax without an installed decoder, absurd dimensions
  (more than :data:`MAX_PIXELS`), dimensions that do not match the pixel data or what a
  JPEG / JPEG 2000 codestream declares, and deflated datasets that would inflate past
  :data:`MAX_INFLATED`. Element lengths are never trusted for allocation: reads are clamped
  to what is left of the file.

Every refusal is a :class:`DicomError` (a :class:`codec.io.ImageError`) whose message names
the source and the reason. Messages never contain patient names, IDs or birth dates: reasons
are built from image-module attributes only, and any text taken from a pydicom exception has the
patient attributes' values removed.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.pixels.utils import _get_jpg_parameters as get_jpg_parameters
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

from codec.io import GrayImage, ImageError, peak_value
from storage.phi import phi_values

__all__ = [
    "MAX_PIXELS",
    "DicomError",
    "DicomImage",
    "is_dicom",
    "read_dicom",
]

#: Largest Rows x Columns accepted (a 16-bit image this size is 256 MiB). Detector X-rays are
#: at most about 4300 x 4300 (18.5 M pixels); anything much bigger is a corrupt header.
MAX_PIXELS = 128 * 1024 * 1024
#: Largest dataset a Deflated Explicit VR file may inflate to: the largest pixel data plus
#: room for a header. pydicom inflates the whole dataset at once, so a small file that inflates
#: to gigabytes (a "zip bomb") is refused before it is handed over.
MAX_INFLATED = 2 * MAX_PIXELS + 16 * 1024 * 1024

#: How many leading bytes :func:`is_dicom` needs to decide.
SNIFF_BYTES = 132

_PREAMBLE = 128
_MAGIC = b"DICM"
# First groups of a preamble-less dataset: command (ACR-NEMA), file meta, identifying.
_FIRST_GROUPS = frozenset({0x0000, 0x0002, 0x0008})
_EXPLICIT_VRS = frozenset(vr.value.encode("ascii") for vr in VR)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Values that must never reach an error message or a log.
_MAX_REASON = 200

Source = str | Path | bytes | bytearray | memoryview | IO[bytes]


class DicomError(ImageError):
    """A DICOM input Radiarc cannot archive; the message names the source and the reason."""


@dataclass(frozen=True)
class DicomImage:
    """One decoded single-frame grayscale DICOM image.

    ``image`` holds the raw stored values; ``photometric`` is MONOCHROME1 or MONOCHROME2 and is
    metadata only; ``header`` is the full dataset without (7FE0,0010) Pixel Data (its
    ``file_meta`` carries the transfer syntax, filled in from the parsed encoding for files that
    had none); ``transfer_syntax_uid`` is the syntax the pixels were stored in.
    """

    image: GrayImage
    photometric: str
    header: Dataset
    transfer_syntax_uid: str
    high_bits_masked: bool = False


def is_dicom(head: bytes) -> bool:
    """Whether ``head`` (the first :data:`SNIFF_BYTES` bytes or more) looks like DICOM.

    True for a Part 10 file (``DICM`` at offset 128) and for a preamble-less dataset whose first
    element is a plausible group 0000/0002/0008 element in implicit or explicit little-endian VR
    (old ACR-NEMA files). A true answer is only a sniff: :func:`read_dicom` still has to parse
    the file and find pixel data in it.
    """
    if len(head) >= _PREAMBLE + len(_MAGIC) and head[_PREAMBLE : _PREAMBLE + 4] == _MAGIC:
        return True
    return _looks_preambleless(head)


def _looks_preambleless(head: bytes) -> bool:
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head, 0)
    if group not in _FIRST_GROUPS or element > 0x00FF or not any(head[:_PREAMBLE]):
        return False
    if head[4:6] in _EXPLICIT_VRS:
        return True
    (length,) = struct.unpack_from("<I", head, 4)
    if element == 0:  # a group length element is a 4-byte UL
        return length == 4
    return length < 0x10000 and length % 2 == 0


def read_dicom(source: Source, name: str | None = None) -> DicomImage:
    """Read a single-frame grayscale DICOM file; see the module docstring for the rules.

    ``source`` is a path, the file's bytes, or a binary file-like object positioned at the
    start of the file (seekable or not). ``name`` labels error messages; it defaults to the
    path or the file object's ``name``.
    """
    label = name if name is not None else _label(source)
    with _open(source, label) as stream:
        dataset, encoding_ts = _parse(stream, label)
    return _decode(dataset, encoding_ts, label)


def _label(source: Source) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    return str(getattr(source, "name", None) or "<stream>")


@contextmanager
def _open(source: Source, label: str) -> Iterator[IO[bytes]]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(bytes(source))
        return
    if isinstance(source, str | Path):
        try:
            handle = open(source, "rb")  # noqa: SIM115 - closed below, after parsing
        except OSError as error:
            raise DicomError(label, f"cannot read file ({error.strerror or error})") from error
        with handle:
            yield _ClampedReads.of(handle)
        return
    seekable = False
    try:
        seekable = bool(source.seekable())
    except (AttributeError, OSError, ValueError):
        seekable = False
    if seekable:
        yield _ClampedReads.of(source)
    else:  # pydicom seeks while parsing; buffer a forward-only stream
        yield io.BytesIO(source.read())


class _ClampedReads:
    """A seekable binary stream whose reads never ask for more than is left in it.

    pydicom reads an element's value with one ``read(length)`` of its declared length, and a
    file object allocates the whole request before reading: a 2 KB file that declares a
    4 GB element would allocate 4 GB. (In-memory sources are safe: ``BytesIO`` clamps.)
    """

    def __init__(self, stream: IO[bytes], end: int) -> None:
        self._stream = stream
        self._end = end

    @classmethod
    def of(cls, stream: IO[bytes]) -> IO[bytes]:
        try:
            end = os.fstat(stream.fileno()).st_size
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            position = stream.tell()
            end = stream.seek(0, io.SEEK_END)
            stream.seek(position)
        return cast(IO[bytes], cls(stream, end))

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._stream.read()
        size = min(size, max(0, self._end - self._stream.tell()))
        return self._stream.read(size) if size else b""

    def __getattr__(self, name: str) -> Any:  # seek, tell, name, ... of the stream
        return getattr(self._stream, name)


def _parse(stream: IO[bytes], label: str) -> tuple[Dataset, UID]:
    """Parse the whole dataset; return it and the transfer syntax its pixels are encoded in."""
    start = stream.tell()
    head = stream.read(SNIFF_BYTES)
    stream.seek(start)
    if not head:
        raise DicomError(label, "empty file (0 bytes)")
    has_magic = len(head) >= _PREAMBLE + 4 and head[_PREAMBLE : _PREAMBLE + 4] == _MAGIC
    if not has_magic and not _looks_preambleless(head):
        raise DicomError(
            label, "not a DICOM file (no 'DICM' marker and no ACR-NEMA element at the start)"
        )
    if has_magic:
        _refuse_inflation_bomb(stream, label)
    try:
        dataset = pydicom.dcmread(stream, force=not has_magic)
    except InvalidDicomError as error:
        raise DicomError(label, f"not a DICOM file ({_clean(error)})") from error
    except (EOFError, struct.error) as error:
        raise DicomError(label, f"truncated file ({_clean(error)})") from error
    except Exception as error:  # pydicom raises many types on corrupt element streams
        raise DicomError(label, f"corrupt DICOM file ({_clean(error)})") from error
    if len(dataset) == 0:
        raise DicomError(
            label, "no data elements could be parsed (truncated or corrupt file, or not DICOM)"
        )

    meta = dataset.file_meta
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        syntax = _syntax_from_encoding(dataset, label)
        if meta is None:
            dataset.file_meta = pydicom.dataset.FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = syntax
    return dataset, UID(str(syntax))


def _refuse_inflation_bomb(stream: IO[bytes], label: str) -> None:
    """Refuse a Deflated Explicit VR file whose dataset inflates past :data:`MAX_INFLATED`
    (counted in 1 MiB steps, nothing kept); anything else is left to pydicom."""
    start = stream.tell()
    try:
        stream.seek(start + _PREAMBLE + len(_MAGIC))
        meta = _read_file_meta_info(cast(BinaryIO, stream))
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater, pending, total = zlib.decompressobj(-zlib.MAX_WBITS), stream.read(), 0
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
            if total > MAX_INFLATED:
                raise DicomError(
                    label,
                    f"deflated dataset inflates to more than {MAX_INFLATED >> 20} MiB "
                    "(a decompression bomb or a corrupt file)",
                )
    except DicomError:
        raise
    except Exception:  # a damaged meta group or deflate stream: pydicom reports it below
        return
    finally:
        stream.seek(start)


def _syntax_from_encoding(dataset: Dataset, label: str) -> UID:
    implicit, little = dataset.original_encoding
    if implicit and little:
        return ImplicitVRLittleEndian
    if implicit is False and little:
        return ExplicitVRLittleEndian
    if implicit is False and little is False:
        return ExplicitVRBigEndian
    raise DicomError(label, "no transfer syntax and the encoding could not be determined")


def _decode(dataset: Dataset, syntax: UID, label: str) -> DicomImage:
    if "PixelData" not in dataset:
        if "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset:
            raise DicomError(label, "float pixel data is not supported")
        raise DicomError(label, "no pixel data (7FE0,0010) in the file")
    try:
        pixel_data = dataset.PixelData
    except Exception as error:
        raise DicomError(label, f"unreadable pixel data ({_clean(error)})") from error
    if not pixel_data:  # pydicom gives None for a zero-length element
        raise DicomError(label, "pixel data (7FE0,0010) is empty")

    frames = _int_attr(dataset, "NumberOfFrames", label, default=1)
    if frames != 1:
        raise DicomError(label, f"multi-frame image (NumberOfFrames={frames}) is not supported")
    samples = _int_attr(dataset, "SamplesPerPixel", label, default=1)
    photometric = _text_attr(dataset, "PhotometricInterpretation", label)
    if samples != 1 or photometric not in _MONOCHROME:
        shown = photometric or "missing"
        raise DicomError(
            label,
            f"not a grayscale image (SamplesPerPixel={samples}, PhotometricInterpretation="
            f"{shown}); only MONOCHROME1/MONOCHROME2 are supported",
        )
    rows = _int_attr(dataset, "Rows", label)
    columns = _int_attr(dataset, "Columns", label)
    if rows < 1 or columns < 1 or rows * columns > MAX_PIXELS:
        raise DicomError(label, f"implausible image dimensions {rows}x{columns}")
    allocated = _int_attr(dataset, "BitsAllocated", label)
    stored = _int_attr(dataset, "BitsStored", label)
    if allocated not in (8, 16):
        raise DicomError(label, f"BitsAllocated={allocated} is not supported (only 8 or 16)")
    if not 8 <= stored <= 16:
        raise DicomError(label, f"BitsStored={stored} is outside the supported 8..16")
    if stored > allocated:
        raise DicomError(label, f"BitsStored={stored} exceeds BitsAllocated={allocated}")
    high_bit = _int_attr(dataset, "HighBit", label, default=stored - 1)
    if high_bit != stored - 1:
        raise DicomError(
            label,
            f"HighBit={high_bit} with BitsStored={stored} is not supported "
            "(values not right-aligned)",
        )
    if _int_attr(dataset, "PixelRepresentation", label) != 0:
        raise DicomError(label, "signed pixel data (PixelRepresentation=1) is not supported")

    decoder = _decoder(syntax, label)
    if not syntax.is_encapsulated:
        expected = rows * columns * (allocated // 8)
        actual = len(pixel_data)
        if actual not in (expected, expected + 1):
            raise DicomError(
                label,
                f"pixel data is {actual} bytes but {rows}x{columns} at {allocated} bits needs "
                f"{expected} (truncated file or wrong dimensions)",
            )
    else:
        first = _check_fragments(pixel_data, label)
        declared = _codestream_size(first)
        if declared is not None and declared != (rows, columns):
            raise DicomError(
                label,
                f"compressed pixel data declares {declared[0]}x{declared[1]} pixels but the "
                f"header says {rows}x{columns} (corrupt or hostile file)",
            )

    array = _pixel_array(decoder, dataset, syntax, samples, label)
    if array.shape != (rows, columns):
        raise DicomError(
            label, f"decoded pixels have shape {array.shape}, header says {rows}x{columns}"
        )
    array, masked = _to_contract(array, stored, label)
    del dataset.PixelData
    try:
        image = GrayImage(array, stored)
    except ValueError as error:  # should not happen after masking; keep the contract explicit
        raise DicomError(label, str(error)) from error
    return DicomImage(
        image=image,
        photometric=photometric,
        header=dataset,
        transfer_syntax_uid=str(syntax),
        high_bits_masked=masked,
    )


def _check_fragments(data: bytes, label: str) -> bytes:
    """Refuse encapsulated pixel data whose items run past its end (a truncated file); return
    the first fragment (the one after the offset table)."""
    offset, size, items, first = 0, len(data), 0, b""
    while offset < size:
        if size - offset < 8:
            raise DicomError(label, "truncated encapsulated pixel data (partial item header)")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        if (group, element) != (0xFFFE, 0xE000):
            raise DicomError(
                label, f"corrupt encapsulated pixel data (tag ({group:04X},{element:04X}))"
            )
        if items == 1:
            first = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
        items += 1
        if offset > size:
            raise DicomError(
                label, f"truncated encapsulated pixel data (item {items} runs past the end)"
            )
    if items < 2:
        raise DicomError(label, "encapsulated pixel data has no fragments")
    return first


def _codestream_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG 2000 (SIZ) or JPEG / JPEG-LS (SOF) codestream declares,
    None for other formats. Decoders allocate what the codestream says, not what the DICOM
    header says: a few bytes changed there would otherwise make a small file a memory bomb."""
    if fragment[:4] == b"\xff\x4f\xff\x51" and len(fragment) >= 24:  # SOC, SIZ
        width, height, left, top = struct.unpack_from(">IIII", fragment, 8)
        return max(0, height - top), max(0, width - left)
    if fragment[:2] == b"\xff\xd8":  # SOI
        parameters = get_jpg_parameters(fragment)
        if "height" in parameters:
            return int(parameters["height"]), int(parameters["width"])
    return None


def _decoder(syntax: UID, label: str) -> Decoder:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise DicomError(
            label, f"transfer syntax {syntax.name} ({syntax}) has no pixel data decoder"
        ) from error
    if not decoder.is_available:
        raise DicomError(
            label,
            f"no decoder installed for transfer syntax {syntax.name} ({syntax}); "
            "install pylibjpeg with its openjpeg/libjpeg/rle plugins",
        )
    return decoder


def _pixel_array(
    decoder: Decoder, dataset: Dataset, syntax: UID, samples: int, label: str
) -> np.ndarray:
    options: dict[str, Any] = {"correct_unused_bits": False, "samples_per_pixel": samples}
    try:
        array = decoder.as_array(dataset, raw=True, validate=True, **options)[0]
    except Exception as error:  # decoders raise RuntimeError, ValueError, ...
        raise DicomError(
            label, f"cannot decode {syntax.name} pixel data ({_clean(error, dataset)})"
        ) from error
    return np.asarray(array)


def _to_contract(array: np.ndarray, stored: int, label: str) -> tuple[np.ndarray, bool]:
    """Unsigned 8/16-bit pixels with bits above ``stored`` cleared; whether any were set."""
    if array.dtype.kind not in "ui" or array.dtype.itemsize > 2:
        raise DicomError(label, f"decoder returned unsupported sample type {array.dtype}")
    array = array.astype(np.uint16 if array.dtype.itemsize == 2 else np.uint8, copy=False)
    peak = peak_value(stored)
    masked = bool(array.size) and int(array.max()) > peak
    if masked:
        if not array.flags.writeable:
            array = array.copy()
        np.bitwise_and(array, array.dtype.type(peak), out=array)
    if stored == 8 and array.dtype != np.uint8:
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array), masked


def _int_attr(dataset: Dataset, keyword: str, label: str, default: int | None = None) -> int:
    try:
        value = dataset.get(keyword)
    except Exception as error:
        raise DicomError(label, f"unreadable {keyword} ({_clean(error)})") from error
    if value is None or value == "":
        if default is None:
            raise DicomError(label, f"missing {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise DicomError(label, f"{keyword} is not an integer") from error


def _text_attr(dataset: Dataset, keyword: str, label: str) -> str:
    try:  # pydicom converts an element when first read, and can fail then (unknown VR)
        return str(dataset.get(keyword) or "").strip()
    except Exception as error:
        raise DicomError(label, f"unreadable {keyword} ({_clean(error)})") from error


def _clean(error: BaseException, dataset: Dataset | None = None) -> str:
    """An exception's text, shortened, without any patient-identifying value in it."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    text = " ".join(text.split())
    if dataset is not None:
        for value in phi_values(dataset):
            text = text.replace(value, "<redacted>")
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return text
