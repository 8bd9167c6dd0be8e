"""PNG input/output under the pixel contract (codec.io)."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from codec.io import GrayImage, ImageError, read_png, write_png

DATA = Path(__file__).parent / "data"
GRAY_PNG = DATA / "00007617_000.png"
RGBA_PNG = DATA / "00004934_000.png"


def test_reads_8bit_gray_nih_png() -> None:
    image = read_png(GRAY_PNG)
    assert image.pixels.shape == (1024, 1024)
    assert image.pixels.dtype == np.uint8
    assert image.bits_stored == 8
    assert image.peak == 255
    assert np.array_equal(image.pixels, imagecodecs.png_decode(GRAY_PNG.read_bytes()))


def test_rgba_with_equal_channels_becomes_gray() -> None:
    raw = imagecodecs.png_decode(RGBA_PNG.read_bytes())
    assert raw.ndim == 3 and raw.shape[2] == 4  # the committed file really is RGBA
    image = read_png(RGBA_PNG)
    assert image.pixels.shape == (1024, 1024)
    assert image.pixels.dtype == np.uint8
    assert image.bits_stored == 8
    assert np.array_equal(image.pixels, raw[:, :, 0])
    assert image.pixels.flags.c_contiguous


def _ramp16(top: int) -> np.ndarray:
    return np.linspace(0, top, 64 * 48).reshape(64, 48).round().astype(np.uint16)


@pytest.mark.parametrize(("top", "bits"), [(1000, 10), (4095, 12), (40000, 16), (200, 8)])
def test_16bit_png_infers_bits_from_maximum(tmp_path: Path, top: int, bits: int) -> None:
    path = tmp_path / "ramp.png"
    path.write_bytes(imagecodecs.png_encode(_ramp16(top)))
    image = read_png(path)
    assert image.pixels.dtype == np.uint16
    assert image.bits_stored == bits
    assert int(image.pixels.max()) == top


def test_16bit_png_with_explicit_bits_stored(tmp_path: Path) -> None:
    path = tmp_path / "ramp.png"
    path.write_bytes(imagecodecs.png_encode(_ramp16(1000)))
    assert read_png(path, bits_stored=12).bits_stored == 12
    with pytest.raises(ImageError, match=r"ramp\.png.*exceeds 9 bits"):
        read_png(path, bits_stored=9)


def test_real_colour_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :, 0] = 200
    path = tmp_path / "colour.png"
    path.write_bytes(imagecodecs.png_encode(rgb))
    with pytest.raises(ImageError, match=r"colour\.png: colour image") as info:
        read_png(path)
    assert info.value.source == str(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        GRAY_PNG.read_bytes()[:2000],
        b"this is not an image\n",
    ],
    ids=["empty", "signature-only", "truncated", "text"],
)
def test_corrupt_png_is_image_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"broken\.png: "):
        read_png(path)


def test_missing_png_is_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read file"):
        read_png(tmp_path / "absent.png")


def test_round_trip_8bit(tmp_path: Path) -> None:
    original = read_png(GRAY_PNG)
    write_png(tmp_path / "copy.png", original)
    again = read_png(tmp_path / "copy.png")
    assert again.pixels.dtype == np.uint8
    assert again.bits_stored == 8
    assert np.array_equal(again.pixels, original.pixels)


def test_round_trip_16bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 1 << 12, size=(37, 53), dtype=np.uint16)
    pixels[0, 0] = (1 << 12) - 1
    write_png(tmp_path / "deep.png", GrayImage(pixels, 12))
    again = read_png(tmp_path / "deep.png", bits_stored=12)
    assert again.pixels.dtype == np.uint16
    assert again.bits_stored == 12
    assert np.array_equal(again.pixels, pixels)
    assert read_png(tmp_path / "deep.png").bits_stored == 12  # inferred from the maximum


def test_gray_image_enforces_contract() -> None:
    with pytest.raises(ValueError, match="2-D"):
        GrayImage(np.zeros((2, 2, 2), np.uint8), 8)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        GrayImage(np.zeros((2, 2), np.int16), 8)
    with pytest.raises(ValueError, match=r"8\.\.16"):
        GrayImage(np.zeros((2, 2), np.uint16), 7)
    with pytest.raises(ValueError, match="does not fit"):
        GrayImage(np.zeros((2, 2), np.uint8), 10)
    with pytest.raises(ValueError, match="exceeds 10 bits"):
        GrayImage(np.full((2, 2), 1024, np.uint16), 10)
