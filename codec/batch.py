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

from collections.abc import Sequence

from codec import resolution
from codec.bitstream import StreamHeader
from codec.io import GrayImage
from codec.learned import EncodedTile, TileCandidates, code_blocks
from codec.tiling import TileBox, batches_by_padded_shape, padded_side
from codec.weights import DEFAULT_MODEL_ID, LoadedModel, load_model

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
    refine_steps: int = 0,
    half_res: bool = False,
    measure: bool = True,
) -> list[TileCandidates]:
    """Each block coded as a one-tile image to ``iterations`` (default: as trained), its
    codes refined ``refine_steps`` steps (:mod:`codec.refine`); with ``half_res``, also at
    half resolution (:mod:`codec.resolution`), for a bpp target to choose between.
    ``measure=False`` skips measuring errors (:func:`codec.learned.code_blocks`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loaded = load_model(model_id)
    limit = loaded.model.config.max_iterations
    if iterations is not None and not 1 <= iterations <= limit:
        raise ValueError(f"{model_id} runs 1..{limit} iterations, asked {iterations}")
    count = iterations or loaded.trained_iterations
    coding = (loaded, count, with_ssim, batch_size, refine_steps)
    full = _code_in_batches(blocks, *coding, half_res=False, measure=measure)
    halves = _code_in_batches(blocks, *coding, half_res=True, measure=measure) if half_res else None
    results = []
    for index, (block, tile) in enumerate(zip(blocks, full, strict=True)):
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
        half = None if halves is None else [halves[index]]
        results.append(
            TileCandidates(header, [TileBox(0, 0, height, width)], [tile], block.peak, half)
        )
    return results


def _code_in_batches(
    blocks: Sequence[GrayImage],
    loaded: LoadedModel,
    iterations: int,
    with_ssim: bool,
    batch_size: int,
    refine_steps: int,
    half_res: bool,
    measure: bool,
) -> list[EncodedTile]:
    """Every block coded, ``batch_size`` blocks of one padded (coded) shape per network call."""
    coded: list[EncodedTile | None] = [None] * len(blocks)
    shapes = [block.pixels.shape for block in blocks]
    if half_res:
        shapes = [resolution.half_shape(*shape) for shape in shapes]
    for indices in batches_by_padded_shape(shapes, batch_size):
        tiles = code_blocks(
            [blocks[i] for i in indices],
            loaded,
            iterations,
            with_ssim,
            refine_steps=refine_steps,
            half_res=half_res,
            measure=measure,
        )
        for index, tile in zip(indices, tiles, strict=True):
            coded[index] = tile
    return [tile for tile in coded if tile is not None]
