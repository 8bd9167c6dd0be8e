"""Decoded pixels are the same at any torch thread count (codec.tile_threads).

16-bit streams make the test sharp: a float difference of 1e-7 in the decoder is 0.007 of a
16-bit level, so before tiles ran one per call on one thread, about 1 pixel in 2,500 of these
streams changed between 1, 2 and 3 threads; at 8 bits it was about 1 in 250,000.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codec.io import GrayImage
from codec.learned import decode_image, encode_image
from codec.rate import RateControl

DECODE_WITH_THREADS = """
import sys, numpy, torch
torch.set_num_threads(int(sys.argv[1]))
from codec.learned import decode_image
numpy.save(sys.argv[3], decode_image(open(sys.argv[2], 'rb').read()).pixels)
"""


@pytest.fixture(scope="module")
def crop_16bit(chest_xray: GrayImage) -> GrayImage:
    return GrayImage(chest_xray.pixels[:512, :480].astype(np.uint16) * 257, 16)


@pytest.mark.parametrize(
    "rate", [RateControl(iterations=4), RateControl(bpp=0.1, half_res=True)], ids=["full", "half"]
)
def test_decoding_is_identical_across_thread_counts(
    crop_16bit: GrayImage, rate: RateControl, tmp_path: Path, one_thread_torch: None
) -> None:
    result = encode_image(crop_16bit, rate, tile_size=256)
    assert any(result.half_res) == bool(rate.half_res)
    path = tmp_path / "crop.rdrc"
    path.write_bytes(result.data)
    decoded = []
    for threads in (1, 2, 3):
        out = tmp_path / f"{threads}.npy"
        subprocess.run(
            [sys.executable, "-c", DECODE_WITH_THREADS, str(threads), str(path), str(out)],
            check=True,
        )
        decoded.append(np.load(out))
    assert all(np.array_equal(decoded[0], other) for other in decoded[1:])
    assert np.array_equal(decoded[0], decode_image(result.data).pixels)
