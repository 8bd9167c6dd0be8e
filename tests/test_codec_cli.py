"""`radiarc encode`, `decode` and `info` as a user runs them, on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from codec.io import GrayImage, read_png, write_png
from codec.metrics import psnr
from flows.cli import app

runner = CliRunner()


def small_png(tmp_path: Path, chest_xray: GrayImage) -> Path:
    path = tmp_path / "crop.png"
    write_png(path, GrayImage(chest_xray.pixels[300:556, 300:620].copy(), 8))
    return path


def test_encode_decode_info_round_trip(tmp_path: Path, chest_xray: GrayImage) -> None:
    source = small_png(tmp_path, chest_xray)
    stream, output = tmp_path / "crop.rdrc", tmp_path / "back.png"
    encoded = runner.invoke(app, ["encode", str(source), str(stream), "--bpp", "0.5"])
    assert encoded.exit_code == 0, encoded.output
    assert "bpp" in encoded.output and stream.stat().st_size * 8 / (256 * 320) <= 0.5
    decoded = runner.invoke(app, ["decode", str(stream), str(output)])
    assert decoded.exit_code == 0, decoded.output
    original, restored = read_png(source), read_png(output)
    assert restored.pixels.shape == original.pixels.shape
    assert psnr(original.pixels, restored.pixels, 8) > 20
    described = runner.invoke(app, ["info", str(stream)])
    assert described.exit_code == 0, described.output
    assert "320x256 pixels" in described.output and "8 bits stored" in described.output


def test_adaptive_encode_writes_format_2_and_decodes(tmp_path: Path, chest_xray: GrayImage) -> None:
    source = small_png(tmp_path, chest_xray)
    stream, output = tmp_path / "crop.rdrc", tmp_path / "back.png"
    encoded = runner.invoke(app, ["encode", str(source), str(stream), "--bpp", "0.3", "--adaptive"])
    assert encoded.exit_code == 0, encoded.output
    assert "adaptive" in encoded.output and stream.stat().st_size * 8 / (256 * 320) <= 0.3
    described = runner.invoke(app, ["info", str(stream)])
    assert "format version 2 (blocks stop refining one by one)" in described.output
    assert runner.invoke(app, ["decode", str(stream), str(output)]).exit_code == 0
    assert psnr(read_png(source).pixels, read_png(output).pixels, 8) > 30
    refused = runner.invoke(app, ["encode", str(source), str(stream), "--adaptive"])
    assert refused.exit_code == 2 and "needs a bpp target" in refused.output


def test_decode_fewer_iterations_gives_the_prefix(tmp_path: Path, chest_xray: GrayImage) -> None:
    source = small_png(tmp_path, chest_xray)
    stream = tmp_path / "crop.rdrc"
    runner.invoke(app, ["encode", str(source), str(stream), "--iterations", "4"])
    coarse, fine = tmp_path / "coarse.png", tmp_path / "fine.png"
    assert (
        runner.invoke(app, ["decode", str(stream), str(coarse), "--iterations", "1"]).exit_code == 0
    )
    assert runner.invoke(app, ["decode", str(stream), str(fine)]).exit_code == 0
    assert not np.array_equal(read_png(coarse).pixels, read_png(fine).pixels)


def test_encode_dicom_keeps_its_bit_depth(tmp_path: Path, data_dir: Path) -> None:
    stream, output = tmp_path / "mono1.rdrc", tmp_path / "mono1.png"
    source = data_dir / "CR-MONO1-10-chest.dcm"
    assert (
        runner.invoke(app, ["encode", str(source), str(stream), "--iterations", "2"]).exit_code == 0
    )
    assert runner.invoke(app, ["decode", str(stream), str(output)]).exit_code == 0
    restored = read_png(output, bits_stored=10)
    assert restored.pixels.dtype == np.uint16 and restored.pixels.shape == (440, 440)


def test_bad_inputs_fail_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.rdrc"
    garbage.write_bytes(b"RDRC\x01" + bytes(40))
    result = runner.invoke(app, ["decode", str(garbage), str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "garbage.rdrc" in result.output
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    result = runner.invoke(app, ["encode", str(not_image), str(tmp_path / "y.rdrc")])
    assert result.exit_code == 2 and "notes.txt" in result.output
    result = runner.invoke(
        app,
        ["encode", str(not_image), str(tmp_path / "y.rdrc"), "--bpp", "0.5", "--iterations", "2"],
    )
    assert result.exit_code == 2 and "exactly one" in result.output
    assert not (tmp_path / "y.rdrc").exists()


def test_every_command_has_help() -> None:
    for command in ("encode", "decode", "info", "train", "bench"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
