"""DICOM input (storage.dicom) and content-based format dispatch (storage.images)."""

from __future__ import annotations

import io
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import storage.dicom as dicom_module
from codec.io import GrayImage, ImageError
from storage.dicom import DicomError, DicomImage, is_dicom, read_dicom
from storage.images import load_image

DATA = Path(__file__).parent / "data"
SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
MONO1 = DATA / "CR-MONO1-10-chest.dcm"
RG3 = DATA / "RG3_J2KR.dcm"
LUT = DATA / "CR-ModalitySequenceLUT.dcm"
PNG = DATA / "00013122_000.png"

# name: (shape, bits stored, photometric, transfer syntax, min, max)
EXPECTED = {
    MONO1.name: ((440, 440), 10, "MONOCHROME1", "1.2.840.10008.1.2", 0, 979),
    RG3.name: ((1760, 1760), 10, "MONOCHROME1", "1.2.840.10008.1.2.4.90", 0, 1023),
    LUT.name: ((1576, 1976), 10, "MONOCHROME1", "1.2.840.10008.1.2.4.70", 0, 1023),
}

_CACHE: dict[Path, DicomImage] = {}


def decoded(path: Path) -> DicomImage:
    """Decode each committed file once per session; tests must not mutate the result."""
    if path not in _CACHE:
        _CACHE[path] = read_dicom(path)
    return _CACHE[path]


def phi_values(path: Path) -> list[str]:
    """Non-empty PatientName/PatientID/PatientBirthDate values and name components, raw."""
    dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    values: list[str] = []
    for tag in (0x00100010, 0x00100020, 0x00100030):
        if tag in dataset:
            raw = dataset.get_item(tag).value
            text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw or "")
            text = text.strip(" \x00")
            values += [part for part in [text, *text.split("^")] if len(part.strip()) >= 3]
    return values


def assert_clean_error(error: ImageError, path: Path, source: Path, log: str = "") -> None:
    """The message names the file and a reason, and leaks no patient value."""
    message = str(error)
    assert path.name in message
    assert error.reason and error.reason in message
    for value in phi_values(source):
        assert value not in message, "patient value leaked into an error message"
        assert value not in log, "patient value leaked into the log"


# ---------------------------------------------------------------------------- good files


@pytest.mark.parametrize("path", [MONO1, RG3, LUT], ids=lambda p: p.name)
def test_leak_checks_are_not_vacuous(path: Path) -> None:
    assert phi_values(path), "each committed DICOM has a non-empty PatientName"


def test_pydicom_error_text_is_redacted() -> None:
    dataset = pydicom.dcmread(RG3, stop_before_pixels=True)
    values = phi_values(RG3)
    error = ValueError("bad element values: " + " / ".join(values))
    cleaned = dicom_module._clean(error, dataset)
    assert "bad element values" in cleaned
    for value in values:
        assert value not in cleaned


@pytest.mark.parametrize("path", [MONO1, RG3, LUT], ids=lambda p: p.name)
def test_committed_files_decode(path: Path) -> None:
    shape, bits, photometric, syntax, low, high = EXPECTED[path.name]
    result = decoded(path)
    assert isinstance(result.image, GrayImage)
    assert result.image.pixels.shape == shape
    assert result.image.pixels.dtype == np.uint16
    assert result.image.bits_stored == bits
    assert result.photometric == photometric
    assert result.transfer_syntax_uid == syntax
    assert int(result.image.pixels.min()) == low
    assert int(result.image.pixels.max()) == high
    assert not result.high_bits_masked


@pytest.mark.parametrize("path", [MONO1, RG3, LUT], ids=lambda p: p.name)
def test_header_is_kept_without_pixel_data(path: Path) -> None:
    header = decoded(path).header
    assert "PixelData" not in header
    assert header.Rows == EXPECTED[path.name][0][0]
    assert "PatientName" in header  # kept for export; never printed
    assert header.file_meta.TransferSyntaxUID == EXPECTED[path.name][3]


def test_rg3_jpeg2000_lossless_matches_an_independent_decoder() -> None:
    dataset = pydicom.dcmread(RG3)
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    assert np.array_equal(decoded(RG3).image.pixels, imagecodecs.jpeg2k_decode(frame))


def test_jpeg_lossless_matches_an_independent_decoder() -> None:
    dataset = pydicom.dcmread(LUT)
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    assert np.array_equal(decoded(LUT).image.pixels, imagecodecs.ljpeg_decode(frame))
    assert "ModalityLUTSequence" in decoded(LUT).header  # not applied, only kept


def test_monochrome1_is_not_inverted() -> None:
    """The pixels are the stored values, byte for byte: no inversion, LUT or rescale."""
    dataset = pydicom.dcmread(MONO1, force=True)
    stored = np.frombuffer(dataset.PixelData, dtype="<u2").reshape(440, 440)
    assert np.array_equal(decoded(MONO1).image.pixels, stored)


def test_acr_nema_file_has_no_preamble() -> None:
    head = MONO1.read_bytes()[:132]
    assert head[128:132] != b"DICM"
    assert is_dicom(head)
    assert decoded(MONO1).header.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_reads_bytes_and_streams() -> None:
    content = MONO1.read_bytes()
    expected = decoded(MONO1).image.pixels

    class ForwardOnly(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            chunk = self._inner.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    from_bytes = read_dicom(content, name="in-memory.dcm")
    from_stream = read_dicom(io.BufferedReader(ForwardOnly(content)))
    with MONO1.open("rb") as handle:
        from_handle = read_dicom(handle)
    for result in (from_bytes, from_stream, from_handle):
        assert np.array_equal(result.image.pixels, expected)
    with pytest.raises(DicomError, match=r"^in-memory\.dcm: "):
        read_dicom(content[:1000], name="in-memory.dcm")


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="needs ../shared/data/dicom")
def test_rg1_uncompressed_and_jpeg2000_agree() -> None:
    plain = read_dicom(SHARED_DICOM / "RG1_UNCR.dcm")
    j2k = read_dicom(SHARED_DICOM / "RG1_J2KR.dcm")
    assert plain.transfer_syntax_uid == ExplicitVRLittleEndian
    assert plain.image.pixels.shape == (1955, 1841)
    assert plain.image.bits_stored == 15
    assert np.array_equal(plain.image.pixels, j2k.image.pixels)


# ---------------------------------------------------------------------------- dispatch


def test_load_image_dispatches_by_content_not_extension(tmp_path: Path) -> None:
    cases = {
        "noextension": MONO1,
        "scan.png": MONO1,  # ACR-NEMA with a PNG extension
        "image.jpg": LUT,
        "xray.dcm": PNG,  # a PNG with a DICOM extension
        "plain": PNG,
    }
    for name, source in cases.items():
        shutil.copyfile(source, tmp_path / name)
        image = load_image(tmp_path / name)
        expected = decoded(source).image if source.suffix == ".dcm" else None
        if expected is None:
            assert image.pixels.dtype == np.uint8 and image.bits_stored == 8
            assert image.pixels.shape == (1024, 1024)
        else:
            assert image.bits_stored == expected.bits_stored
            assert np.array_equal(image.pixels, expected.pixels)


def test_load_image_refuses_other_content(tmp_path: Path) -> None:
    for name, content in {
        "notes.dcm": b"PatientName is not here; this is text\n" * 10,
        "empty.png": b"",
        "zeros": bytes(4096),
        "tiff.dcm": imagecodecs.tiff_encode(np.zeros((8, 8), np.uint8)),
    }.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ImageError, match="not a PNG or DICOM file") as info:
            load_image(path)
        assert name in str(info.value)
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "absent")


def test_is_dicom_sniffing() -> None:
    assert is_dicom(RG3.read_bytes()[:132])
    assert is_dicom(MONO1.read_bytes()[:132])
    assert not is_dicom(b"")
    assert not is_dicom(bytes(132))
    assert not is_dicom(PNG.read_bytes()[:132])
    assert not is_dicom(b"hello world, this is a text file" * 5)


# ---------------------------------------------------------------------------- bad inputs


def mono1_dataset() -> Dataset:
    """The ACR-NEMA chest as a dataset with file meta, ready to be altered and saved."""
    dataset = pydicom.dcmread(MONO1, force=True)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    meta.MediaStorageSOPInstanceUID = UID("1.2.392.200036.9125.0.19950720112207")
    dataset.file_meta = meta
    return dataset


def _multi_frame(ds: Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _colour(ds: Dataset) -> None:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = ds.PixelData * 3


def _palette(ds: Dataset) -> None:
    ds.PhotometricInterpretation = "PALETTE COLOR"


def _no_pixels(ds: Dataset) -> None:
    del ds.PixelData


def _bits(stored: int, high: int | None = None) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.BitsStored = stored
        ds.HighBit = stored - 1 if high is None else high

    return change


def _signed(ds: Dataset) -> None:
    ds.PixelRepresentation = 1


def _huge(ds: Dataset) -> None:
    ds.Rows = 65535
    ds.Columns = 65535


def _rows_mismatch(ds: Dataset) -> None:
    ds.Rows = 400


def _bits_allocated_32(ds: Dataset) -> None:
    ds.BitsAllocated = 32


def _unknown_syntax(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2, no decoder
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


BAD_VARIANTS: dict[str, tuple[Callable[[Dataset], None], str]] = {
    "multi-frame": (_multi_frame, r"multi-frame image \(NumberOfFrames=2\)"),
    "colour": (_colour, r"not a grayscale image \(SamplesPerPixel=3"),
    "palette": (_palette, r"PhotometricInterpretation=PALETTE COLOR"),
    "no-pixel-data": (_no_pixels, r"no pixel data"),
    "bits-stored-20": (_bits(20), r"BitsStored=20 is outside the supported 8\.\.16"),
    "bits-stored-6": (_bits(6), r"BitsStored=6 is outside"),
    "high-bit-15": (_bits(10, high=15), r"HighBit=15 with BitsStored=10"),
    "signed": (_signed, r"signed pixel data \(PixelRepresentation=1\)"),
    "huge": (_huge, r"implausible image dimensions 65535x65535"),
    "rows-mismatch": (_rows_mismatch, r"pixel data is 387200 bytes but 400x440"),
    "bits-allocated-32": (_bits_allocated_32, r"BitsAllocated=32 is not supported"),
    "unknown-syntax": (_unknown_syntax, r"has no pixel data decoder"),
}


@pytest.mark.parametrize("variant", list(BAD_VARIANTS))
def test_bad_dataset_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, variant: str
) -> None:
    change, reason = BAD_VARIANTS[variant]
    dataset = mono1_dataset()
    change(dataset)
    path = tmp_path / f"{variant}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(DicomError, match=reason) as info:
        read_dicom(path)
    assert_clean_error(info.value, path, MONO1, caplog.text)
    with pytest.raises(ImageError, match=reason):  # same refusal through the dispatcher
        load_image(path)


def test_missing_decoder_plugin_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unavailable:
        is_available = False

    monkeypatch.setattr(dicom_module, "get_decoder", lambda uid: Unavailable())
    path = tmp_path / "needs-plugin.dcm"
    shutil.copyfile(RG3, path)
    with pytest.raises(DicomError, match="no decoder installed for transfer syntax JPEG 2000"):
        read_dicom(path)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize(
    ("source", "cut", "reason"),
    [
        (MONO1, 1000, "pixel data is 224 bytes"),
        (RG3, 1000, "corrupt DICOM file"),
        (LUT, 1000, "no pixel data"),
        (MONO1, 200_000, "truncated file or wrong dimensions"),
        (RG3, 400_000, "truncated or corrupt file"),
    ],
    ids=["mono1-1000", "rg3-1000", "lut-1000", "mono1-half", "rg3-half"],
)
def test_truncated_file_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, source: Path, cut: int, reason: str
) -> None:
    path = tmp_path / "cut.dcm"  # neutral names: a test file's patient name is "RG3"-like
    path.write_bytes(source.read_bytes()[:cut])
    with caplog.at_level(logging.DEBUG), pytest.raises(DicomError, match=reason) as info:
        read_dicom(path)
    assert_clean_error(info.value, path, source, caplog.text)


def test_truncated_fragment_is_refused(tmp_path: Path) -> None:
    content = bytearray(RG3.read_bytes())
    end = content.rindex(b"\xfe\xff\xdd\xe0")  # sequence delimiter after the last fragment
    path = tmp_path / "short-fragment.dcm"
    path.write_bytes(bytes(content[: end - 100] + content[end:]))
    with pytest.raises(DicomError, match="truncated encapsulated pixel data") as info:
        read_dicom(path)
    assert_clean_error(info.value, path, RG3)


def test_empty_and_text_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DicomError, match=r"empty\.dcm: empty file \(0 bytes\)"):
        read_dicom(empty)
    text = tmp_path / "report.dcm"
    text.write_text("Findings: no acute cardiopulmonary process.\n" * 20)
    with pytest.raises(DicomError, match=r"report\.dcm: not a DICOM file"):
        read_dicom(text)
    with pytest.raises(DicomError, match="cannot read file"):
        read_dicom(tmp_path / "absent.dcm")


def _flip(source: Path, offset: int, bit: int, path: Path) -> Path:
    content = bytearray(source.read_bytes())
    content[offset] ^= 1 << bit
    path.write_bytes(bytes(content))
    return path


def _offset_of_value(source: Path, tag: bytes) -> int:
    """Offset of an element's value, for implicit VR (4-byte length) or explicit VR US/UL."""
    content = source.read_bytes()
    at = content.index(tag)
    return at + 8


def test_bit_flipped_headers_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cases = [
        # 'DICM' marker damaged: no longer recognisable as DICOM
        (RG3, 129, 0, "not a DICOM file"),
        # Rows of the ACR-NEMA file: 440 -> 440 + 32768
        (MONO1, _offset_of_value(MONO1, b"\x28\x00\x10\x00") + 1, 7, "pixel data is 387200"),
        # Columns of the JPEG 2000 file: 1760 -> 1760 ^ 0x0400 (the codestream disagrees)
        (
            RG3,
            _offset_of_value(RG3, b"\x28\x00\x11\x00US") + 1,
            2,
            "compressed pixel data declares 1760x1760 pixels but the header says 1760x736",
        ),
    ]
    for index, (source, offset, bit, reason) in enumerate(cases):
        path = _flip(source, offset, bit, tmp_path / f"flipped-{index}.dcm")
        with caplog.at_level(logging.DEBUG), pytest.raises(DicomError, match=reason) as info:
            read_dicom(path)
        assert_clean_error(info.value, path, source, caplog.text)


def test_random_header_bit_flips_never_crash(tmp_path: Path) -> None:
    """A damaged header gives either a valid image or a DicomError, never another exception."""
    rng = random.Random(20240601)
    content = MONO1.read_bytes()
    header_end = content.index(b"\xe0\x7f\x10\x00")  # start of (7FE0,0010)
    for trial in range(40):
        damaged = bytearray(content)
        damaged[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        try:
            result = read_dicom(bytes(damaged), name=f"trial-{trial}")
        except DicomError as error:
            assert str(error).startswith(f"trial-{trial}: ")
            for value in phi_values(MONO1):
                assert value not in str(error)
        else:
            assert result.image.pixels.ndim == 2


def test_high_bits_are_masked_and_recorded(tmp_path: Path) -> None:
    dataset = mono1_dataset()
    stored = np.frombuffer(dataset.PixelData, dtype="<u2").reshape(440, 440)
    dirty = stored.copy()
    dirty[::7, ::5] |= 0xF000  # overlay bits / garbage above BitsStored=10
    dataset.PixelData = dirty.astype("<u2").tobytes()
    path = tmp_path / "overlay-bits.dcm"
    dataset.save_as(path, enforce_file_format=True)
    result = read_dicom(path)
    assert result.high_bits_masked
    assert np.array_equal(result.image.pixels, stored)


def test_eight_bit_dicom_gives_uint8(tmp_path: Path) -> None:
    dataset = mono1_dataset()
    stored = np.frombuffer(dataset.PixelData, dtype="<u2").reshape(440, 440)
    small = (stored >> 2).astype(np.uint8)
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelData = small.tobytes()
    dataset["PixelData"].VR = "OB"
    path = tmp_path / "eight.dcm"
    dataset.save_as(path, enforce_file_format=True)
    result = read_dicom(path)
    assert result.image.pixels.dtype == np.uint8
    assert result.image.bits_stored == 8
    assert np.array_equal(result.image.pixels, small)
