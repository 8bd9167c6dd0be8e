"""Tile geometry: where each tile sits in the image, and padding to the network's grid."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from codec.model import DOWNSAMPLING


@dataclass(frozen=True)
class TileBox:
    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return padded_side(self.height), padded_side(self.width)


def padded_side(side: int) -> int:
    return -(-side // DOWNSAMPLING) * DOWNSAMPLING


def tile_boxes(height: int, width: int, tile_size: int) -> list[TileBox]:
    """Row-major tiles of ``tile_size``; the last row and column are smaller when needed."""
    return [
        TileBox(top, left, min(tile_size, height - top), min(tile_size, width - left))
        for top in range(0, height, tile_size)
        for left in range(0, width, tile_size)
    ]


def tiles_touching(boxes: list[TileBox], rows: tuple[int, int], cols: tuple[int, int]) -> list[int]:
    """Indices of the tiles that intersect the half-open region ``rows`` x ``cols``."""
    return [
        index
        for index, box in enumerate(boxes)
        if box.top < rows[1]
        and rows[0] < box.top + box.height
        and box.left < cols[1]
        and cols[0] < box.left + box.width
    ]


def pad_tile(tile: np.ndarray) -> np.ndarray:
    """Extend a tile to the network grid by repeating its edge: smooth, so it costs few bits."""
    height, width = tile.shape
    return np.pad(
        tile, ((0, padded_side(height) - height), (0, padded_side(width) - width)), "edge"
    )


def batches_by_padded_shape(
    shapes: Sequence[tuple[int, int]], batch_size: int
) -> Iterator[list[int]]:
    """Indices of ``shapes`` grouped by padded shape, at most ``batch_size`` per group: tiles
    that pad to the same grid can share one network call."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (height, width) in enumerate(shapes):
        groups[(padded_side(height), padded_side(width))].append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]
