"""Encode and decode whole images with the learned codec: tiles, network, entropy coder, stream.

Tiles of the same padded shape go through the network together. Each tile's iterations are
entropy-coded into segments; rate control picks how many each tile keeps; the container is
written by :mod:`codec.bitstream`. Decoding can stop after any number of iterations and can
decode only the tiles a region touches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from codec import bitstream, entropy
from codec.bitstream import BitstreamError, Stream, StreamHeader
from codec.block_stops import ThresholdSearch, block_stop_rule
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


def _valid_pixels(blocks: Sequence[GrayImage], padded: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W): 1.0 on each block's pixels, 0.0 on the padding to the network grid."""
    valid = torch.zeros(len(blocks), 1, *padded)
    for position, block in enumerate(blocks):
        height, width = block.pixels.shape
        valid[position, 0, :height, :width] = 1.0
    return valid


def code_blocks(
    blocks: Sequence[GrayImage],
    loaded: LoadedModel,
    iterations: int,
    with_ssim: bool,
    stop_threshold_db: float | None = None,
    refine_steps: int = 0,
) -> list[EncodedTile]:
    """One network call over blocks that pad to one shape; each block's entropy-coded
    segments and the error each iteration leaves (what rate control chooses from).

    Blocks may differ in bit depth: each is normalised by its own peak. With
    ``stop_threshold_db`` each 16x16 block stops refining once good enough
    (:mod:`codec.block_stops`; format 2 segments), and a tile ends when all its blocks have.
    ``refine_steps`` searches each code for a better one (:mod:`codec.refine`).
    """
    stacked = np.stack([pad_tile(_normalise(block.pixels, block.peak)) for block in blocks])
    x = torch.from_numpy(stacked[:, None]).to(model_device(loaded))
    stop_rule = None
    if stop_threshold_db is not None:
        valid = _valid_pixels(blocks, stacked.shape[1:]).to(x.device)
        stop_rule = block_stop_rule(stop_threshold_db, valid)
    codes, reconstructions = loaded.model.compress(x, iterations, stop_rule, refine_steps)
    bits = [(code > 0).to(torch.uint8).cpu().numpy() for code in codes]
    active = [(code != 0).any(dim=1).cpu().numpy() for code in codes]
    coded = []
    for position, block in enumerate(blocks):
        original = block.pixels
        height, width = original.shape
        tile = EncodedTile([], [], [])
        previous = None
        for k in range(iterations):
            refined = active[k][position]
            if not refined.any():
                break  # every block of this tile has stopped: the tile ends here
            previous_active = active[k - 1][position] if stop_rule and k else None
            tile.segments.append(
                entropy.encode_iteration(
                    bits[k][position], previous, k, loaded.tables, refined, previous_active
                )
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
    image: GrayImage,
    boxes: list[TileBox],
    loaded: LoadedModel,
    iterations: int,
    with_ssim: bool,
    stop_threshold_db: float | None = None,
    refine_steps: int = 0,
) -> list[EncodedTile]:
    blocks = [GrayImage(image.pixels[box.slices], image.bits_stored) for box in boxes]
    encoded: list[EncodedTile | None] = [None] * len(boxes)
    shapes = [(box.height, box.width) for box in boxes]
    for batch in batches_by_padded_shape(shapes, TILE_BATCH):
        coded = code_blocks(
            [blocks[i] for i in batch],
            loaded,
            iterations,
            with_ssim,
            stop_threshold_db,
            refine_steps,
        )
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
    if rate.iterations is not None:
        return [len(t.segments) for t in tiles], True
    if rate.bpp is not None:
        costs = [[len(s) + _varint_size(len(s)) for s in t.segments] for t in tiles]
        chosen = allocate_bytes(costs, [t.squared_errors for t in tiles], budget)
        spent = sum(sum(c[:k]) for c, k in zip(costs, chosen, strict=True))
        return chosen, spent <= budget
    chosen, met = [], True
    for tile, box in zip(tiles, boxes, strict=True):
        most = len(tile.segments)
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

    @property
    def iterations(self) -> int:
        """The most iterations any tile was coded to."""
        return max(len(tile.segments) for tile in self.tiles)

    @property
    def full_size(self) -> int:
        """Bytes of the stream that keeps every coded iteration."""
        segments = sum(len(s) + _varint_size(len(s)) for t in self.tiles for s in t.segments)
        return len(bitstream.pack(Stream(self.header, [[] for _ in self.boxes]))) + segments

    def squared_error(self, chosen: list[int]) -> float:
        """Total squared error of the image when each tile keeps ``chosen`` iterations."""
        return sum(t.squared_errors[k - 1] for t, k in zip(self.tiles, chosen, strict=True))

    def select(self, rate: RateControl) -> EncodeResult:
        """The stream ``rate`` asks for (its iterations must not exceed those coded)."""
        if rate.iterations is not None and rate.iterations > self.iterations:
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
    stop_threshold_db: float | None = None,
    refine_steps: int = 0,
) -> TileCandidates:
    """Run the network once over every tile, to ``iterations`` (default: as trained); with
    ``stop_threshold_db``, blocks stop refining once good enough (a format 2 stream); with
    ``refine_steps``, each code is refined that many steps (:mod:`codec.refine`)."""
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be 0 or more, got {refine_steps}")
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
        block_stops=stop_threshold_db is not None,
    )
    boxes = tile_boxes(height, width, tile_size)
    count = iterations or loaded.trained_iterations
    tiles = _encode_tiles(image, boxes, loaded, count, with_ssim, stop_threshold_db, refine_steps)
    return TileCandidates(header, boxes, tiles, image.peak)


class AdaptiveCandidates:
    """One image coded with block stops at the thresholds a bpp target needs, cached so that
    several targets on one image (the bench's case) share network runs.

    Each target runs its own threshold search, so it picks among exactly the thresholds a
    single ``radiarc encode --bpp X --adaptive`` would try, and :meth:`network_seconds` says
    what coding those thresholds took: the encode time of that one command, cache or not."""

    def __init__(
        self,
        image: GrayImage,
        model_id: str = DEFAULT_MODEL_ID,
        tile_size: int = DEFAULT_TILE_SIZE,
        refine_steps: int = 0,
    ) -> None:
        self.image = image
        self.model_id = model_id
        self.tile_size = tile_size
        self.refine_steps = refine_steps
        self._coded: dict[float, TileCandidates] = {}
        self._seconds: dict[float, float] = {}  # network and entropy coding, per threshold
        self._searched: dict[float, list[float]] = {}  # bpp -> thresholds its search tried

    def at(self, threshold_db: float) -> TileCandidates:
        if threshold_db not in self._coded:
            started = time.perf_counter()
            self._coded[threshold_db] = encode_candidates(
                self.image,
                None,
                self.model_id,
                self.tile_size,
                stop_threshold_db=threshold_db,
                refine_steps=self.refine_steps,
            )
            self._seconds[threshold_db] = time.perf_counter() - started
        return self._coded[threshold_db]

    def select(self, bpp: float) -> EncodeResult:
        """The stream with the least squared error among those not above ``bpp``; the
        thresholds are searched, and tiles may drop late iterations as in the uniform mode."""
        rate = RateControl(bpp=bpp)
        budget = int(bpp * self.image.pixels.size / 8)
        search = ThresholdSearch(lambda threshold: self.at(threshold).full_size)
        self._searched[bpp] = thresholds = search.run(budget)
        best: tuple[float, EncodeResult] | None = None
        for threshold in thresholds:
            candidates = self.at(threshold)
            result = candidates.select(rate)
            error = candidates.squared_error(result.tile_iterations)
            if best is None or (result.target_met, -error) > (best[1].target_met, -best[0]):
                best = (error, result)
        assert best is not None  # the search always tries its first thresholds
        return best[1]

    def network_seconds(self, bpp: float) -> float:
        """Seconds spent coding the thresholds that :meth:`select` ``(bpp)`` searched."""
        if bpp not in self._searched:
            raise KeyError(f"no stream was selected at {bpp} bpp")
        return sum(self._seconds[threshold] for threshold in self._searched[bpp])


def encode_image(
    image: GrayImage,
    rate: RateControl,
    model_id: str = DEFAULT_MODEL_ID,
    tile_size: int = DEFAULT_TILE_SIZE,
    refine_steps: int = 0,
) -> EncodeResult:
    """Compress ``image`` into a Radiarc stream under ``rate``; ``refine_steps`` trades
    encoding time for quality at low rates (:mod:`codec.refine`)."""
    if rate.adaptive and rate.bpp is not None:
        return AdaptiveCandidates(image, model_id, tile_size, refine_steps).select(rate.bpp)
    candidates = encode_candidates(
        image,
        rate.iterations,
        model_id,
        tile_size,
        with_ssim=rate.min_ssim is not None,
        refine_steps=refine_steps,
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


def _decode_codes(
    segments: list[bytes], shape: tuple[int, int, int], loaded: LoadedModel, block_stops: bool
) -> list[np.ndarray]:
    """A tile's codes per iteration as the network reads them: +-1, and 0 in stopped blocks."""
    codes: list[np.ndarray] = []
    previous, previous_active = None, None
    for k, segment in enumerate(segments):
        bits, active = entropy.decode_iteration(
            segment, shape, previous, k, loaded.tables, previous_active if block_stops else None
        )
        if not active.any():
            raise BitstreamError(f"iteration {k + 1} of a tile refines no block")
        codes.append((bits.astype(np.float32) * 2 - 1) * active)
        previous, previous_active = bits, active
    return codes


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
        tile_codes = [
            _decode_codes(segments, shape, loaded, header.block_stops) for segments in kept
        ]
        most = max(len(c) for c in tile_codes)
        codes = []
        for k in range(most):
            # Tiles that ended earlier get zero codes, which leave their pixels as they were.
            stopped = np.zeros(shape, np.float32)
            layer = np.stack([c[k] if k < len(c) else stopped for c in tile_codes])
            codes.append(torch.from_numpy(layer).to(device))
        reconstructions = loaded.model.decompress(codes)
        for position, index in enumerate(indices):
            box = boxes[index]
            pixels = _to_pixels(
                reconstructions[len(tile_codes[position]) - 1][position, 0], peak, dtype
            )
            pixels = pixels[: box.height, : box.width]
            top, left = max(box.top, rows[0]), max(box.left, cols[0])
            bottom = min(box.top + box.height, rows[1])
            right = min(box.left + box.width, cols[1])
            output[top - rows[0] : bottom - rows[0], left - cols[0] : right - cols[0]] = pixels[
                top - box.top : bottom - box.top, left - box.left : right - box.left
            ]
    return GrayImage(output, header.bits_stored)
