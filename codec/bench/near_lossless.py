"""Lossless and near-lossless bit rates: the residual layer against the classical coders.

    python -m codec.bench.near_lossless IMAGES... [--max-errors 0,1,2,4] [--model MODEL_ID]

For each image and each max error D, the bpp of ``radiarc encode --max-error D`` (every pixel
checked within D on decoded pixels) beside JPEG-LS with NEAR = D (8- and 16-bit images only)
and, once per image, JPEG 2000 and JPEG XL lossless. Prints a markdown table
(docs/codec.md, "Stop 11").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from codec.baselines import JPEG2000, JPEGLS, JPEGXL, CodecUnsupported
from codec.io import GrayImage
from codec.learned import decode_image
from codec.metrics import bits_per_pixel
from codec.near_lossless import ResidualCandidates
from codec.weights import DEFAULT_MODEL_ID


def _jpegls(image: GrayImage, max_error: int) -> str:
    codec = JPEGLS()
    try:
        data = codec.encode_lossless(image) if max_error == 0 else codec.encode(image, max_error)
    except CodecUnsupported:
        return "-"
    return f"{bits_per_pixel(len(data), image.pixels.size):.3f}"


def image_row(name: str, image: GrayImage, max_errors: list[int], model_id: str) -> list[str]:
    """The table row of one image: ours and JPEG-LS per D, then J2K and JXL lossless."""
    layered = ResidualCandidates.encode(image, model_id)
    row = [name, str(image.bits_stored)]
    for max_error in max_errors:
        result = layered.stream(max_error)
        decoded = decode_image(result.data).pixels.astype(np.int64)
        if np.abs(decoded - image.pixels).max() > max_error:
            raise AssertionError(f"{name}: a pixel is off by more than {max_error}")
        row += [
            f"{bits_per_pixel(result.n_bytes, image.pixels.size):.3f}",
            _jpegls(image, max_error),
        ]
    for codec in (JPEG2000(), JPEGXL()):
        row.append(f"{bits_per_pixel(len(codec.encode_lossless(image)), image.pixels.size):.3f}")
    return row


def main(argv: list[str] | None = None) -> None:
    from storage.images import load_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="PNG or DICOM files")
    parser.add_argument("--max-errors", default="0,1,2,4", help="comma-separated D values")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="installed model id")
    args = parser.parse_args(argv)
    max_errors = [int(value) for value in args.max_errors.split(",")]
    header = ["image", "bits"]
    for max_error in max_errors:
        header += [f"ours D={max_error}", f"JPEG-LS {max_error}"]
    header += ["J2K lossless", "JXL lossless"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in args.images:
        row = image_row(path.name, load_image(path), max_errors, args.model)
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
