"""Load an X-ray image from disk whatever its format, recognised by content, not by extension."""

from __future__ import annotations

from pathlib import Path

from codec.io import GrayImage, ImageError, read_png
from storage.dicom import SNIFF_BYTES, is_dicom, read_dicom

__all__ = ["PNG_SIGNATURE", "is_dicom", "is_png", "load_image"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(head: bytes) -> bool:
    """Whether ``head`` starts with the PNG signature."""
    return head.startswith(PNG_SIGNATURE)


def load_image(path: str | Path) -> GrayImage:
    """Read a PNG or DICOM file as a :class:`GrayImage`, choosing the reader by the bytes.

    PNG is recognised by its signature; DICOM by ``DICM`` at offset 128 or, for preamble-less
    ACR-NEMA files, by a plausible first data element (the DICOM reader then has to parse it
    and find pixel data). DICOM pixels are the raw stored values (see :mod:`storage.dicom`).
    Anything else raises :class:`ImageError` naming the file and "not a PNG or DICOM file";
    DICOM problems raise :class:`storage.dicom.DicomError`, a subclass of it.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as error:
        raise ImageError(path, f"cannot read file ({error.strerror or error})") from error
    if not head:
        raise ImageError(path, "empty file (0 bytes); not a PNG or DICOM file")
    if is_png(head):
        return read_png(path)
    if is_dicom(head):
        return read_dicom(path).image
    raise ImageError(path, "not a PNG or DICOM file")
