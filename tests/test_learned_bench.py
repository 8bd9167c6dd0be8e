"""The learned codec as a bench codec, beside JPEG 2000, on real bytes."""

from __future__ import annotations

import numpy as np

from codec.baselines import JPEG2000
from codec.bench import run_bench
from codec.io import GrayImage
from codec.learned_rd import LearnedCodec
from codec.weights import DEFAULT_MODEL_ID


def test_learned_codec_points_are_real_streams_under_target(chest_xray: GrayImage) -> None:
    crop = GrayImage(np.ascontiguousarray(chest_xray.pixels[256:512, 384:640]), 8)
    learned = LearnedCodec(DEFAULT_MODEL_ID, tile_size=256)
    rows = run_bench([("crop", crop)], [learned, JPEG2000()], [0.25, 0.5])
    ours = [row for row in rows if row.codec == DEFAULT_MODEL_ID]
    assert [row.target_bpp for row in ours] == [0.25, 0.5]
    for row in ours:
        assert row.bpp <= row.target_bpp
        assert row.bytes * 8 / crop.pixels.size == row.bpp
        assert 10 < row.psnr < 99
    assert ours[0].bytes < ours[1].bytes
    # Both rates come from one coding of every tile, and each is charged for all of it.
    assert learned._last is not None
    assert min(row.encode_seconds for row in ours) >= learned._last[2] > 0
    assert {row.codec for row in rows} == {DEFAULT_MODEL_ID, "jpeg2000"}


def test_adaptive_learned_codec_is_benched_under_its_own_name(chest_xray: GrayImage) -> None:
    crop = GrayImage(np.ascontiguousarray(chest_xray.pixels[256:512, 384:640]), 8)
    learned = LearnedCodec.named(DEFAULT_MODEL_ID + "+blocks")
    assert learned.adaptive and learned.model_id == DEFAULT_MODEL_ID
    learned.tile_size = 256
    rows = run_bench([("crop", crop)], [learned], [0.2])
    assert [row.codec for row in rows] == [DEFAULT_MODEL_ID + "+blocks"]
    assert rows[0].bpp <= 0.2 and rows[0].psnr > 30
    # The encode time is the rate-controlled encode's: every threshold its search coded.
    assert learned._last_adaptive is not None
    assert rows[0].encode_seconds >= learned._last_adaptive.network_seconds(0.2) > 0
