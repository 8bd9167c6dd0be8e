"""Classical anchors: real codecs, real bytes, each at the image's true bit depth."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest

from codec.baselines import (
    BASELINES,
    HTJ2K,
    JPEG,
    JPEG2000,
    JPEGLS,
    JPEGXL,
    CodecUnsupported,
    RateDistortionCodec,
    RateUnreachable,
)
from codec.io import GrayImage
from codec.metrics import bits_per_pixel, max_abs_error, psnr

ALL = sorted(BASELINES)


def bpp(data: bytes, image: GrayImage) -> float:
    return bits_per_pixel(len(data), image.pixels.size)


def decoded(codec: RateDistortionCodec, data: bytes, image: GrayImage) -> np.ndarray:
    shape = (image.pixels.shape[0], image.pixels.shape[1])
    return codec.decode(data, shape, image.bits_stored)


def j2k_precision(codestream: bytes) -> int:
    """Bits per sample recorded in a J2K codestream's SIZ marker (one component)."""
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    return (codestream[42] & 0x7F) + 1


def jpeg_precision(stream: bytes, start_of_frame: bytes) -> int:
    """Sample precision P from a JPEG / JPEG-LS start-of-frame marker."""
    at = stream.find(start_of_frame)
    assert at >= 0, f"no {start_of_frame.hex()} marker"
    return stream[at + 4]


def test_registry_names_the_five_baselines() -> None:
    assert set(BASELINES) == {"jpeg2000", "htj2k", "jpegxl", "jpeg", "jpegls"}
    for name, codec in BASELINES.items():
        assert codec.name == name
        assert issubclass(codec, RateDistortionCodec)


@pytest.mark.parametrize("name", ALL)
def test_lossy_round_trip_keeps_shape_dtype_and_quality(name: str, xray_8bit: GrayImage) -> None:
    codec = BASELINES[name]()
    data, parameter = codec.encode_at_bpp(xray_8bit, 1.0)
    pixels = decoded(codec, data, xray_8bit)
    assert pixels.shape == xray_8bit.pixels.shape
    assert pixels.dtype == np.uint8
    assert max_abs_error(xray_8bit.pixels, pixels) > 0
    assert psnr(xray_8bit.pixels, pixels, 8) > 30
    assert codec.encode(xray_8bit, parameter) == data  # deterministic: the point is reproducible


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_lossless_modes_are_exact(name: str, bits: int, request: pytest.FixtureRequest) -> None:
    image: GrayImage = request.getfixturevalue(f"xray_{bits}bit")
    codec = BASELINES[name]()
    if name == "jpegls" and bits == 12:
        with pytest.raises(CodecUnsupported, match="16-bit frames"):
            codec.encode_lossless(image)
        return
    data = codec.encode_lossless(image)
    assert max_abs_error(image.pixels, decoded(codec, data, image)) == 0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("target", [0.25, 1.0])
def test_encode_at_bpp_stays_under_and_close_to_the_target(
    name: str, target: float, xray_8bit: GrayImage
) -> None:
    data, _ = BASELINES[name]().encode_at_bpp(xray_8bit, target)
    # Rate moves in steps: JPEG quality and JPEG-LS NEAR are integers, and a 256x256 image has
    # few code-block truncation points; on full-size images the continuous knobs land within 1%.
    floor = 0.9 if name in ("jpeg2000", "htj2k", "jpegxl") else 0.75
    assert floor * target <= bpp(data, xray_8bit) <= target


def test_encode_at_bpp_returns_the_largest_stream_an_integer_knob_allows(
    xray_8bit: GrayImage,
) -> None:
    codec = JPEG()
    data, quality = codec.encode_at_bpp(xray_8bit, 0.5)
    assert bpp(codec.encode(xray_8bit, quality + 1), xray_8bit) > 0.5
    assert len(data) == len(codec.encode(xray_8bit, quality))


def test_a_rate_below_the_codec_floor_is_reported_not_faked(xray_8bit: GrayImage) -> None:
    with pytest.raises(RateUnreachable) as caught:
        JPEGLS().encode_at_bpp(xray_8bit, 0.001)
    assert caught.value.lowest_bpp > 0.001
    assert "jpegls cannot go down to 0.001 bpp" in str(caught.value)


def test_non_positive_targets_are_rejected(xray_8bit: GrayImage) -> None:
    with pytest.raises(ValueError, match="positive"):
        JPEG2000().encode_at_bpp(xray_8bit, 0)


@pytest.mark.parametrize("bits", [10, 12])
def test_jpeg2000_and_htj2k_streams_record_the_true_bit_depth(
    bits: int, request: pytest.FixtureRequest
) -> None:
    image: GrayImage = request.getfixturevalue(f"xray_{bits}bit")
    for codec in (JPEG2000(), HTJ2K()):
        lossy, _ = codec.encode_at_bpp(image, 1.0)
        assert j2k_precision(lossy) == bits
        assert j2k_precision(codec.encode_lossless(image)) == bits


def test_htj2k_depth_rewrite_matches_a_native_encode_and_another_decoder(
    xray_8bit: GrayImage, xray_12bit: GrayImage
) -> None:
    # The lossy rewrite (shift up to 16 bits, then set SIZ) reproduces a native 8-bit encode.
    native = bytes(imagecodecs.htj2k_encode(xray_8bit.pixels, 0.01, reversible=False))
    shifted = xray_8bit.pixels.astype(np.uint16) << 8
    rewritten = bytearray(imagecodecs.htj2k_encode(shifted, 0.01, reversible=False))
    rewritten[42] = 7
    assert bytes(rewritten) == native
    # OpenJPEG, an independent decoder, reads the rewritten 12-bit streams alike.
    codec = HTJ2K()
    lossless = codec.encode_lossless(xray_12bit)
    assert np.array_equal(imagecodecs.jpeg2k_decode(lossless), xray_12bit.pixels)
    lossy = codec.encode(xray_12bit, 0.002)
    ours = imagecodecs.htj2k_decode(lossy).astype(np.int32)
    assert np.abs(imagecodecs.jpeg2k_decode(lossy).astype(np.int32) - ours).max() <= 1


@pytest.mark.parametrize("name", ALL)
def test_saturated_regions_do_not_wrap_around(name: str, xray_8bit: GrayImage) -> None:
    # Collimator edges and burned-out lung fields sit at the peak; ringing above it must clip.
    pixels = xray_8bit.pixels.copy()
    pixels[64:128, 64:128] = 255
    pixels[64:128, 128:192] = 0
    image = GrayImage(pixels, 8)
    codec = BASELINES[name]()
    data, _ = codec.encode_at_bpp(image, 0.5)
    assert max_abs_error(pixels, decoded(codec, data, image)) < 128


def test_jpeg2000_told_the_true_depth_beats_being_told_16_bits(xray_10bit: GrayImage) -> None:
    pixels = xray_10bit.pixels
    as_16_bit = imagecodecs.jpeg2k_encode(pixels, codecformat="J2K", reversible=True)
    assert len(JPEG2000().encode_lossless(xray_10bit)) < len(as_16_bit)


class JPEGXLToldSixteenBits(JPEGXL):
    """The mistake the real class avoids: a 10-bit image handed over as 16-bit."""

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        return bytes(imagecodecs.jpegxl_encode(image.pixels, distance=parameter, numthreads=1))


def test_jpegxl_told_the_true_depth_is_better_at_equal_rate(xray_10bit: GrayImage) -> None:
    right, wrong = JPEGXL(), JPEGXLToldSixteenBits()
    right_data, _ = right.encode_at_bpp(xray_10bit, 0.5)
    wrong_data, _ = wrong.encode_at_bpp(xray_10bit, 0.5)
    right_psnr = psnr(xray_10bit.pixels, decoded(right, right_data, xray_10bit), 10)
    wrong_psnr = psnr(xray_10bit.pixels, decoded(wrong, wrong_data, xray_10bit), 10)
    assert right_psnr > wrong_psnr + 0.2
    as_16_bit = imagecodecs.jpegxl_encode(xray_10bit.pixels, lossless=True, numthreads=1)
    assert len(right.encode_lossless(xray_10bit)) < len(as_16_bit)


def test_jpeg_uses_12_bit_frames_up_to_12_bits_and_refuses_deeper(
    xray_8bit: GrayImage, xray_12bit: GrayImage, xray_16bit: GrayImage
) -> None:
    codec = JPEG()
    assert jpeg_precision(codec.encode(xray_8bit, 90), b"\xff\xc0") == 8
    data, _ = codec.encode_at_bpp(xray_12bit, 2.0)
    assert jpeg_precision(data, b"\xff\xc1") == 12
    assert psnr(xray_12bit.pixels, decoded(codec, data, xray_12bit), 12) > 40
    with pytest.raises(CodecUnsupported, match="8- and 12-bit"):
        codec.encode_at_bpp(xray_16bit, 1.0)
    # lossless JPEG (process 14) records the true depth
    assert jpeg_precision(codec.encode_lossless(xray_16bit), b"\xff\xc3") == 16


def test_jpegls_codes_8_and_16_bit_images_at_their_depth(
    xray_8bit: GrayImage, xray_16bit: GrayImage, xray_12bit: GrayImage
) -> None:
    codec = JPEGLS()
    assert jpeg_precision(codec.encode(xray_8bit, 2), b"\xff\xf7") == 8
    assert jpeg_precision(codec.encode_lossless(xray_16bit), b"\xff\xf7") == 16
    with pytest.raises(CodecUnsupported, match="12-bit image"):
        codec.encode_at_bpp(xray_12bit, 1.0)


def test_near_lossless_jpegls_keeps_its_error_bound(xray_8bit: GrayImage) -> None:
    codec = JPEGLS()
    data, near = codec.encode_at_bpp(xray_8bit, 1.0)
    assert 0 < max_abs_error(xray_8bit.pixels, decoded(codec, data, xray_8bit)) <= near
