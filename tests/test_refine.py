"""Encoder-side code refinement: better codes for the same decoder, in ordinary streams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from codec import bitstream
from codec.io import GrayImage, read_png, write_png
from codec.learned import _normalise, decode_image, encode_candidates, encode_image
from codec.learned_rd import LearnedCodec, learned_codec_names
from codec.metrics import psnr
from codec.rate import RateControl
from codec.refine import refine_code
from codec.tiling import pad_tile
from codec.weights import DEFAULT_MODEL_ID, load_model
from flows.cli import app

STEPS = 8
DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_thread_torch: None) -> Iterator[None]:
    yield


@pytest.fixture(scope="module")
def crop(chest_xray: GrayImage) -> GrayImage:
    """Lung field, mediastinum and the image edge: 2x2 tiles of 256."""
    return GrayImage(np.ascontiguousarray(chest_xray.pixels[100:500, 60:530]), 8)


def test_refined_code_is_never_worse_for_any_tile(crop: GrayImage) -> None:
    model = load_model(DEFAULT_MODEL_ID).model
    tiles = [crop.pixels[:256, :256], crop.pixels[144:400, 214:470]]
    x = torch.from_numpy(np.stack([pad_tile(_normalise(t, crop.peak)) for t in tiles])[:, None])
    with torch.no_grad():
        target = x * model.log_gains[0].exp()
        soft, _ = model.encoder.soft_code(target, [None] * 3)
        plain = torch.where(soft >= 0, 1.0, -1.0)
    refined = refine_code(model.decoder, [None] * 4, soft, target, None, STEPS)
    assert set(refined.unique().tolist()) <= {-1.0, 1.0}
    assert bool((refined != plain).any())  # it did search: some bits changed
    with torch.no_grad():
        errors = [
            ((model.decoder(code, [None] * 4)[0] - target) ** 2).flatten(1).mean(dim=1)
            for code in (plain, refined)
        ]
    assert bool((errors[1] <= errors[0]).all())
    assert float(errors[1].sum()) < 0.95 * float(errors[0].sum())


def test_refined_stream_decodes_better_at_a_low_rate(crop: GrayImage) -> None:
    """Real streams, read by the ordinary decoder: the first iterations gain most."""
    rate = RateControl(iterations=1)
    plain = encode_candidates(crop, 1, tile_size=256).select(rate)
    refined_candidates = encode_candidates(crop, 1, tile_size=256, refine_steps=STEPS)
    refined = refined_candidates.select(rate)
    assert not bitstream.read_header(refined.data).block_stops  # same format as ever
    plain_pixels = decode_image(plain.data).pixels
    refined_pixels = decode_image(refined.data).pixels
    # the encoder's own reckoning of the error is what the decoder gives, pixel for pixel
    error = np.sum((refined_pixels.astype(np.float64) - crop.pixels) ** 2)
    assert error == refined_candidates.squared_error([1, 1, 1, 1])
    gain = psnr(crop.pixels, refined_pixels, 8) - psnr(crop.pixels, plain_pixels, 8)
    assert gain > 0.3
    assert refined.n_bytes < 1.2 * plain.n_bytes  # flipped bits cost a little more to code


def test_refinement_keeps_stopped_blocks_stopped(crop: GrayImage) -> None:
    candidates = encode_candidates(
        crop, 4, tile_size=256, stop_threshold_db=14.0, refine_steps=STEPS
    )
    assert candidates.header.block_stops
    result = candidates.select(RateControl(iterations=4))
    decoded = decode_image(result.data).pixels.astype(np.float64)
    # a stopped block that got a nonzero code would decode differently from what was coded
    assert np.sum((decoded - crop.pixels) ** 2) == pytest.approx(
        candidates.squared_error(result.tile_iterations)
    )


def test_bad_step_counts_are_refused(crop: GrayImage) -> None:
    with pytest.raises(ValueError, match="refine_steps"):
        encode_candidates(crop, 1, tile_size=256, refine_steps=-1)
    soft = torch.zeros(1, 32, 1, 1)
    with pytest.raises(ValueError, match="at least one step"):
        refine_code(load_model(DEFAULT_MODEL_ID).model.decoder, [None] * 4, soft, soft, None, 0)


def test_bench_names_combine_blocks_and_refine() -> None:
    names = learned_codec_names()
    assert DEFAULT_MODEL_ID + "+blocks+refine" in names and DEFAULT_MODEL_ID + "+refine" in names
    codec = LearnedCodec.named(DEFAULT_MODEL_ID + "+blocks+refine")
    assert codec.adaptive and codec.refine_steps > 0 and codec.model_id == DEFAULT_MODEL_ID
    assert codec.name == DEFAULT_MODEL_ID + "+blocks+refine"
    plain = LearnedCodec.named(DEFAULT_MODEL_ID)
    assert not plain.adaptive and plain.refine_steps == 0 and plain.name == DEFAULT_MODEL_ID


def test_bench_names_carry_a_step_count() -> None:
    """``+refineN`` asks for N steps and keeps its count in the name (rows of different counts
    stay apart in one bench); ``+refine`` with the default count is named as ever."""
    from codec.learned_rd import LayeredCodec, is_learned_codec_name, learned_codec
    from codec.refine import DEFAULT_STEPS, MAX_STEPS

    blocks = learned_codec(DEFAULT_MODEL_ID + "+blocks+refine32")
    assert isinstance(blocks, LearnedCodec) and blocks.adaptive and blocks.refine_steps == 32
    assert blocks.name == DEFAULT_MODEL_ID + "+blocks+refine32"
    layered = learned_codec(DEFAULT_MODEL_ID + "+half+refine16+residual")
    assert isinstance(layered, LayeredCodec) and layered.half_res and layered.refine_steps == 16
    assert layered.name == DEFAULT_MODEL_ID + "+half+refine16+residual"
    same = learned_codec(f"{DEFAULT_MODEL_ID}+refine{DEFAULT_STEPS}")
    assert same.name == DEFAULT_MODEL_ID + "+refine"
    assert is_learned_codec_name(DEFAULT_MODEL_ID + "+half+refine64+residual")
    for wrong in (f"+refine{MAX_STEPS + 1}", "+refine0", "+refinex", "+residual+refine4"):
        assert not is_learned_codec_name(DEFAULT_MODEL_ID + wrong)
    assert not is_learned_codec_name("no-such-model+refine4")
    refused = CliRunner().invoke(
        app, ["bench", "x.png", "--codecs", f"{DEFAULT_MODEL_ID}+refine{MAX_STEPS + 1}"]
    )
    assert refused.exit_code == 2 and "refine" in refused.output


def test_cli_encode_refines_on_request(tmp_path: Path, crop: GrayImage) -> None:
    source, stream, back = tmp_path / "crop.png", tmp_path / "crop.rdrc", tmp_path / "back.png"
    write_png(source, GrayImage(np.ascontiguousarray(crop.pixels[:256, :256]), 8))
    runner = CliRunner()
    arguments = ["encode", str(source), str(stream), "--iterations", "1", "--tile-size", "256"]
    result = runner.invoke(app, [*arguments, "--refine-steps", "4"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["decode", str(stream), str(back)]).exit_code == 0
    assert psnr(read_png(source).pixels, read_png(back).pixels, 8) > 30
    refused = runner.invoke(app, [*arguments, "--refine-steps", "-1"])
    assert refused.exit_code == 2 and "refine-steps" in refused.output


def test_learned_eval_reports_refined_beside_plain(tmp_path: Path, crop: GrayImage) -> None:
    from codec.bench.learned_eval import evaluate

    path = tmp_path / "crop.png"
    write_png(path, GrayImage(np.ascontiguousarray(crop.pixels[:256, :256]), 8))
    plain = evaluate(DEFAULT_MODEL_ID, [path], 2)
    refined = evaluate(DEFAULT_MODEL_ID, [path], 2, refine_steps=STEPS)
    assert [row["iterations"] for row in refined] == [1, 2]
    assert refined[0]["psnr"] > plain[0]["psnr"]
    assert refined[0]["bpp"] < refined[1]["bpp"] < refined[1]["raw_bpp"]


def test_residual_layers_sit_on_refined_codes(crop: GrayImage) -> None:
    """``--residual`` and ``--max-error`` with refinement: the bases under the layers come
    from refined codes (the first iteration's error can only fall), layers still bound every
    pixel, and the bench's ``+half+refine+residual`` is that codec."""
    from codec.learned_rd import LayeredCodec, learned_codec
    from codec.near_lossless import ResidualCandidates

    plain = ResidualCandidates.encode(crop, tile_size=256, base_iterations=(1,))
    refined = ResidualCandidates.encode(
        crop, tile_size=256, base_iterations=(1,), refine_steps=STEPS
    )

    def first_errors(candidates: ResidualCandidates) -> list[float]:
        return [tile.squared_errors[0] for tile in candidates.candidates.tiles]

    assert all(r <= p for r, p in zip(first_errors(refined), first_errors(plain), strict=True))
    assert sum(first_errors(refined)) < 0.97 * sum(first_errors(plain))
    for max_error in (2, 6):
        stream = encode_image(
            crop, RateControl(max_error=max_error), tile_size=256, refine_steps=STEPS
        )
        decoded = decode_image(stream.data).pixels.astype(np.int64)
        assert int(np.abs(decoded - crop.pixels).max()) <= max_error
    rate = RateControl(bpp=0.3, half_res=True, residual=True)
    streams = [encode_image(crop, rate, tile_size=256, refine_steps=s).data for s in (0, STEPS)]
    assert streams[0] != streams[1] and all(len(s) * 8 <= 0.3 * crop.pixels.size for s in streams)
    codec = learned_codec(DEFAULT_MODEL_ID + "+half+refine+residual")
    assert isinstance(codec, LayeredCodec) and codec.half_res and codec.refine_steps == STEPS
    assert codec.name in learned_codec_names()
    assert learned_codec(DEFAULT_MODEL_ID + "+half+residual").refine_steps == 0


def test_momentum_follows_the_step_budget() -> None:
    """Adam's beta1 remembers about a quarter of the search: short searches forget fast,
    long ones keep Adam's usual 0.9; never outside 0.5-0.9."""
    from codec.refine import momentum

    assert [momentum(s) for s in (1, 8, 16, 32, 64, 1000)] == [0.5, 0.5, 0.75, 0.875, 0.9, 0.9]


def test_search_probe_reports_every_budget(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m codec.bench.refine_search``: real tiles through the network; a refined
    first iteration is never worse than the encoder's own code, and a probe's fixed momentum
    does not outlive its run."""
    from codec import refine
    from codec.bench.refine_search import main

    shipped = refine.MOMENTUM_RANGE
    images = [str(DATA / "00007617_000.png"), str(DATA / "00004934_000.png")]
    main([DEFAULT_MODEL_ID, *images, "--searches", "0,2,2:0.9", "--full"])
    assert shipped == refine.MOMENTUM_RANGE
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["0", "-"], ["2", "0.5"], ["2", "0.9"]]
    first = [float(row[2].split(" / ")[0]) for row in rows]
    assert all(len(row[2].split(" / ")) == 4 for row in rows)
    assert first[1] >= first[0] and first[2] >= first[0]
