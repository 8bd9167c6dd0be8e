"""The learned codec as a bench codec, beside JPEG 2000, on real bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


def test_the_speed_bench_measures_any_bench_codec_and_its_seams(
    chest_xray: GrayImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m codec.bench.speed --codec NAME``: a real stream under the target, timed,
    with the error along the 512-pixel tile borders against elsewhere; bad names refused."""
    from codec.bench import speed
    from codec.io import write_png

    crop = GrayImage(np.ascontiguousarray(chest_xray.pixels[256:768, 0:768]), 8)  # 2 tiles
    point = speed.measure_codec(crop, 0.25, "rnnconv-pool-v12+half+residual")
    assert 0 < point.bpp <= 0.25 and point.megapixels == crop.pixels.size / 1e6
    assert point.encode_seconds > 0 and point.decode_seconds > 0
    assert 0 < point.seam_ratio < 10
    # The ratio itself: an error only along the border is all seam; one elsewhere, none.
    mask = speed.border_mask(crop.pixels.shape, 512, 4)
    flat = np.zeros(crop.pixels.shape)
    assert speed.seam_ratio(flat, flat + mask, 512) > 1e6
    assert speed.seam_ratio(flat, flat + ~mask, 512) == 0
    path = tmp_path / "crop.png"
    write_png(path, crop)
    speed.main([str(path), "--codec", "rnnconv-pool-v12+half+residual", "--bpp", "0.25"])
    assert "rnnconv-pool-v12+half+residual, tile 512, target 0.25 bpp" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        speed.main([str(path), "--codec", "rnnconv-pool-v12+sharp"])
