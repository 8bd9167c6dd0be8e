"""Many single-tile images through the network in few calls: the batch path of migrations.

zarr hands :mod:`codec.chunk` one chunk at a time, so the network sees batches of one. A
migration worker holds many chunks of many images at once; :func:`block_candidates` stacks the
blocks of equal padded shape (``batch_size`` per network call, mixed bit depths allowed: the
network sees pixels normalised by each block's peak) and codes each block exactly as
:func:`codec.learned.encode_candidates` codes a one-tile image. A stream selected from the
result is the one ``encode_image(block, rate, model_id, tile_size=padded side)`` writes, up to
float rounding differences between batch sizes (streams decode the same way whatever wrote them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from codec import entropy
from codec.bitstream import StreamHeader
from codec.io import GrayImage
from codec.learned import TileCandidates, _EncodedTile, _normalise, _to_pixels
from codec.metrics import WINDOW, ssim
from codec.tiling import TileBox, pad_tile, padded_side
from codec.weights import DEFAULT_MODEL_ID, LoadedModel, load_model, model_device

__all__ = ["DEFAULT_BATCH_SIZE", "block_candidates"]

#: Tiles per network call. 8 tiles of 512x512 hold about 0.5 GB of activations on CPU.
DEFAULT_BATCH_SIZE = 8


def block_candidates(
    blocks: Sequence[GrayImage],
    iterations: int | None = None,
    model_id: str = DEFAULT_MODEL_ID,
    *,
    with_ssim: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[TileCandidates]:
    """Each block coded as a one-tile image to ``iterations`` (default: as trained)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loaded = load_model(model_id)
    limit = loaded.model.config.max_iterations
    if iterations is not None and not 1 <= iterations <= limit:
        raise ValueError(f"{model_id} runs 1..{limit} iterations, asked {iterations}")
    count = iterations or loaded.trained_iterations
    results: list[TileCandidates | None] = [None] * len(blocks)
    for indices in _groups(blocks, batch_size):
        tiles = _code_group([blocks[i] for i in indices], loaded, count, with_ssim)
        for index, tile in zip(indices, tiles, strict=True):
            block = blocks[index]
            height, width = block.pixels.shape
            header = StreamHeader(
                model_id,
                loaded.weights_hash,
                height,
                width,
                block.bits_stored,
                padded_side(max(height, width)),
                loaded.model.config.bits,
            )
            results[index] = TileCandidates(
                header, [TileBox(0, 0, height, width)], [tile], block.peak
            )
    return [result for result in results if result is not None]


def _groups(blocks: Sequence[GrayImage], batch_size: int) -> Iterator[list[int]]:
    """Block indices grouped by padded shape, at most ``batch_size`` per group."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, block in enumerate(blocks):
        height, width = block.pixels.shape
        groups[(padded_side(height), padded_side(width))].append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


def _code_group(
    blocks: list[GrayImage], loaded: LoadedModel, iterations: int, with_ssim: bool
) -> list[_EncodedTile]:
    """One network call over blocks of one padded shape; entropy coding and the errors each
    iteration leaves, per block (what rate control chooses from)."""
    stacked = np.stack([pad_tile(_normalise(block.pixels, block.peak)) for block in blocks])
    x = torch.from_numpy(stacked[:, None]).to(model_device(loaded))
    codes, reconstructions = loaded.model.compress(x, iterations)
    bits = [(code > 0).to(torch.uint8).cpu().numpy() for code in codes]
    coded = []
    for position, block in enumerate(blocks):
        original = block.pixels
        height, width = original.shape
        tile = _EncodedTile([], [], [])
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
