"""Encode and decode whole images with the learned codec: tiles, network, entropy coder, stream.

Tiles of the same padded shape go through the network together. Each tile's iterations are
entropy-coded into segments; rate control picks how many each tile keeps; the container is
written by :mod:`codec.bitstream`. Decoding can stop after any number of iterations and can
decode only the tiles a region touches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from codec import bitstream, entropy
from codec.bitstream import BitstreamError, Stream, StreamHeader
from codec.io import GrayImage, peak_value
from codec.metrics import WINDOW, ssim
from codec.rate import RateControl, allocate_bytes, first_meeting, psnr_from_sse
from codec.tiling import (
    TileBox,
    batches_by_padded_shape,
    pad_tile,
    tile_boxes,
    tiles_touching,
)
from codec.weights import DEFAULT_MODEL_ID, LoadedModel, load_model, model_device

DEFAULT_TILE_SIZE = 512
TILE_BATCH = 4  # 512x512 tiles per network call: enough to amortise, small enough for RAM


@dataclass(frozen=True)
class EncodeResult:
    data: bytes
    tile_iterations: list[int]
    target_met: bool  # every tile met the floor, or the stream fits the bpp target

    @property
    def n_bytes(self) -> int:
        return len(self.data)


@dataclass
class EncodedTile:
    """One tile coded to some iterations: a segment, and what it leaves, per iteration."""

    segments: list[bytes]
    squared_errors: list[float]
    ssims: list[float]


def _normalise(pixels: np.ndarray, peak: int) -> np.ndarray:
    return pixels.astype(np.float32) / peak - 0.5


def _to_pixels(reconstruction: torch.Tensor, peak: int, dtype: np.dtype) -> np.ndarray:
    values = ((reconstruction.float().cpu().numpy() + 0.5) * peak).round()
    return np.clip(values, 0, peak).astype(dtype)


def code_blocks(
    blocks: Sequence[GrayImage], loaded: LoadedModel, iterations: int, with_ssim: bool
) -> list[EncodedTile]:
    """One network call over blocks that pad to one shape; each block's entropy-coded
    segments and the error each iteration leaves (what rate control chooses from).

    Blocks may differ in bit depth: each is normalised by its own peak.
    """
    stacked = np.stack([pad_tile(_normalise(block.pixels, block.peak)) for block in blocks])
    x = torch.from_numpy(stacked[:, None]).to(model_device(loaded))
    codes, reconstructions = loaded.model.compress(x, iterations)
    bits = [(code > 0).to(torch.uint8).cpu().numpy() for code in codes]
    coded = []
    for position, block in enumerate(blocks):
        original = block.pixels
        height, width = original.shape
        tile = EncodedTile([], [], [])
        previous = None
        for k in range(iterations):
            tile.segments.append(
                entropy.encode_iteration(bits[k][position], previous, k, loaded.tables)
            )
            previous = bits[k][position]
            decoded = _to_pixels(reconstructions[k][position, 0], block.peak, original.dtype)
            decoded = decoded[:height, :width]
            diff = original.astype(np.float64) - decoded
            tile.squared_errors.append(float(np.sum(diff * diff)))
            if with_ssim and min(height, width) >= WINDOW:
                tile.ssims.append(ssim(original, decoded, block.bits_stored))
        coded.append(tile)
    return coded


def _encode_tiles(
    image: GrayImage, boxes: list[TileBox], loaded: LoadedModel, iterations: int, with_ssim: bool
) -> list[EncodedTile]:
    blocks = [GrayImage(image.pixels[box.slices], image.bits_stored) for box in boxes]
    encoded: list[EncodedTile | None] = [None] * len(boxes)
    shapes = [(box.height, box.width) for box in boxes]
    for batch in batches_by_padded_shape(shapes, TILE_BATCH):
        coded = code_blocks([blocks[i] for i in batch], loaded, iterations, with_ssim)
        for index, tile in zip(batch, coded, strict=True):
            encoded[index] = tile
    return [tile for tile in encoded if tile is not None]


def _varint_size(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def _choose_iterations(
    tiles: list[EncodedTile], boxes: list[TileBox], rate: RateControl, peak: int, budget: int
) -> tuple[list[int], bool]:
    """Iterations per tile, and whether the rate target or quality floor was met.

    ``budget`` is the bytes left for segments and their table entries under a bpp target.
    """
    most = len(tiles[0].segments)
    if rate.iterations is not None:
        return [most] * len(tiles), True
    if rate.bpp is not None:
        costs = [[len(s) + _varint_size(len(s)) for s in t.segments] for t in tiles]
        chosen = allocate_bytes(costs, [t.squared_errors for t in tiles], budget)
        spent = sum(sum(c[:k]) for c, k in zip(costs, chosen, strict=True))
        return chosen, spent <= budget
    chosen, met = [], True
    for tile, box in zip(tiles, boxes, strict=True):
        if rate.min_ssim is not None:
            # Slivers narrower than the SSIM window keep every iteration: they cost little.
            k = first_meeting(tile.ssims, rate.min_ssim) if tile.ssims else most
        else:
            pixels = box.height * box.width
            scores = [psnr_from_sse(e, pixels, peak) for e in tile.squared_errors]
            k = first_meeting(scores, rate.min_psnr or 0.0)
        met = met and k is not None
        chosen.append(k or most)
    return chosen, met


@dataclass(frozen=True)
class TileCandidates:
    """Every tile coded to the most iterations: a stream for any rate is a choice among them."""

    header: StreamHeader
    boxes: list[TileBox]
    tiles: list[EncodedTile]
    peak: int

    def select(self, rate: RateControl) -> EncodeResult:
        """The stream ``rate`` asks for (its iterations must not exceed those coded)."""
        if rate.iterations is not None and rate.iterations > len(self.tiles[0].segments):
            raise ValueError("more iterations asked than were coded")
        # The container with no segments: what every stream of this image costs in any case.
        overhead = len(bitstream.pack(Stream(self.header, [[] for _ in self.boxes])))
        pixels = self.header.height * self.header.width
        budget = int((rate.bpp or 0) * pixels / 8) - overhead
        tiles = (
            [EncodedTile(t.segments[: rate.iterations], [], []) for t in self.tiles]
            if rate.iterations is not None
            else self.tiles
        )
        chosen, met = _choose_iterations(tiles, self.boxes, rate, self.peak, budget)
        stream = Stream(self.header, [t.segments[:k] for t, k in zip(tiles, chosen, strict=True)])
        return EncodeResult(bitstream.pack(stream), chosen, met)


def encode_candidates(
    image: GrayImage,
    iterations: int | None = None,
    model_id: str = DEFAULT_MODEL_ID,
    tile_size: int = DEFAULT_TILE_SIZE,
    with_ssim: bool = False,
) -> TileCandidates:
    """Run the network once over every tile, to ``iterations`` (default: as trained)."""
    if tile_size % 16 or tile_size < 16:
        raise ValueError(f"tile size must be a positive multiple of 16, got {tile_size}")
    loaded = load_model(model_id)
    limit = loaded.model.config.max_iterations
    if iterations is not None and not 1 <= iterations <= limit:
        raise ValueError(f"{model_id} runs 1..{limit} iterations, asked {iterations}")
    height, width = image.pixels.shape
    header = StreamHeader(
        model_id,
        loaded.weights_hash,
        height,
        width,
        image.bits_stored,
        tile_size,
        loaded.model.config.bits,
    )
    boxes = tile_boxes(height, width, tile_size)
    count = iterations or loaded.trained_iterations
    tiles = _encode_tiles(image, boxes, loaded, count, with_ssim)
    return TileCandidates(header, boxes, tiles, image.peak)


def encode_image(
    image: GrayImage,
    rate: RateControl,
    model_id: str = DEFAULT_MODEL_ID,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> EncodeResult:
    """Compress ``image`` into a Radiarc stream under ``rate``."""
    candidates = encode_candidates(
        image, rate.iterations, model_id, tile_size, with_ssim=rate.min_ssim is not None
    )
    return candidates.select(rate)


def _check_model(header: StreamHeader) -> LoadedModel:
    loaded = load_model(header.model_id)
    if loaded.weights_hash != header.weights_hash:
        raise BitstreamError(
            f"stream was written by {header.model_id} with weights {header.weights_hash.hex()}, "
            f"but the installed weights are {loaded.weights_hash.hex()}"
        )
    if header.code_channels != loaded.model.config.bits:
        raise BitstreamError(f"stream has {header.code_channels} code channels, model has other")
    return loaded


def _decode_bits(
    segments: list[bytes], shape: tuple[int, int, int], loaded: LoadedModel
) -> list[np.ndarray]:
    bits, previous = [], None
    for k, segment in enumerate(segments):
        previous = entropy.decode_iteration(segment, shape, previous, k, loaded.tables)
        bits.append(previous)
    return bits


def decode_image(
    data: bytes,
    iterations: int | None = None,
    region: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> GrayImage:
    """Decode a stream, optionally keeping only ``iterations`` and only a ``region``.

    ``region`` is ``((row_start, row_stop), (col_start, col_stop))``; the result then holds
    just that region, decoded from the tiles it touches.
    """
    header = bitstream.read_header(data)
    loaded = _check_model(header)
    boxes = tile_boxes(header.height, header.width, header.tile_size)
    rows, cols = region or ((0, header.height), (0, header.width))
    if not (0 <= rows[0] < rows[1] <= header.height and 0 <= cols[0] < cols[1] <= header.width):
        raise ValueError(f"region {rows}x{cols} outside the {header.height}x{header.width} image")
    wanted = tiles_touching(boxes, rows, cols)
    stream = bitstream.unpack(data, set(wanted))
    peak = peak_value(header.bits_stored)
    dtype = np.dtype(np.uint8 if header.bits_stored <= 8 else np.uint16)
    output = np.zeros((rows[1] - rows[0], cols[1] - cols[0]), dtype=dtype)
    device = model_device(loaded)
    shapes = [(boxes[i].height, boxes[i].width) for i in wanted]
    for batch in batches_by_padded_shape(shapes, TILE_BATCH):
        indices = [wanted[i] for i in batch]
        padded = boxes[indices[0]].padded_shape
        shape = (header.code_channels, padded[0] // 16, padded[1] // 16)
        kept = [stream.tiles[i][:iterations] if iterations else stream.tiles[i] for i in indices]
        if any(not segments for segments in kept):
            raise BitstreamError("a tile has no iterations")
        if any(len(segments) > loaded.model.config.max_iterations for segments in kept):
            raise BitstreamError(
                f"a tile has more iterations than the model's {loaded.model.config.max_iterations}"
            )
        tile_bits = [_decode_bits(segments, shape, loaded) for segments in kept]
        most = max(len(b) for b in tile_bits)
        codes = []
        for k in range(most):
            # Tiles that stopped earlier get zero codes; their later outputs are not used.
            layer = np.stack([b[k] if k < len(b) else np.full(shape, 0.5) for b in tile_bits])
            codes.append(torch.from_numpy(layer.astype(np.float32) * 2 - 1).to(device))
        reconstructions = loaded.model.decompress(codes)
        for position, index in enumerate(indices):
            box = boxes[index]
            pixels = _to_pixels(
                reconstructions[len(tile_bits[position]) - 1][position, 0], peak, dtype
            )
            pixels = pixels[: box.height, : box.width]
            top, left = max(box.top, rows[0]), max(box.left, cols[0])
            bottom = min(box.top + box.height, rows[1])
            right = min(box.left + box.width, cols[1])
            output[top - rows[0] : bottom - rows[0], left - cols[0] : right - cols[0]] = pixels[
                top - box.top : bottom - box.top, left - box.left : right - box.left
            ]
    return GrayImage(output, header.bits_stored)
