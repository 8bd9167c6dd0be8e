"""Encode and decode whole images with the learned codec: tiles, network, entropy coder, stream.

When encoding, tiles of the same padded shape go through the network together. Each tile's
iterations are entropy-coded into segments; rate control picks how many each tile keeps, from
the error each iteration leaves as readers will decode it; the container is written by
:mod:`codec.bitstream`. Decoding runs one tile per network call, tiles side by side on threads
(:mod:`codec.tile_threads`), so the pixels are the same at any thread count; it can stop after
any number of iterations and decode only the tiles a region touches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from codec import bitstream, entropy, resolution
from codec.bitstream import BitstreamError, Stream, StreamHeader
from codec.block_stops import ThresholdSearch, block_stop_rule, refined_thresholds
from codec.coarse import apply_correction, decode_coarse
from codec.io import GrayImage, peak_value
from codec.metrics import WINDOW, ssim
from codec.rate import (
    Ladder,
    RateControl,
    allocate_bytes,
    allocate_ladders,
    first_meeting,
    psnr_from_sse,
)
from codec.residual import decode_residual, layer_bound, reconstruct, smoothed
from codec.tile_threads import map_tiles
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
    half_res: list[bool] = field(default_factory=list)  # per tile; empty: all full resolution
    max_error: int | None = None  # with a residual layer: no pixel is off by more

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


def _valid_pixels(shapes: Sequence[tuple[int, ...]], padded: tuple[int, ...]) -> torch.Tensor:
    """(N, 1, H, W): 1.0 on each coded tile's pixels, 0.0 on the padding to the network grid."""
    valid = torch.zeros(len(shapes), 1, *padded)
    for position, (height, width) in enumerate(shapes):
        valid[position, 0, :height, :width] = 1.0
    return valid


def code_blocks(
    blocks: Sequence[GrayImage],
    loaded: LoadedModel,
    iterations: int,
    with_ssim: bool,
    stop_threshold_db: float | None = None,
    refine_steps: int = 0,
    half_res: bool = False,
    measure: bool = True,
) -> list[EncodedTile]:
    """One network call over blocks that pad to one shape; each block's entropy-coded
    segments and, with ``measure``, the error each iteration leaves (what rate control
    chooses from).

    Blocks may differ in bit depth: each is normalised by its own peak. With
    ``stop_threshold_db`` each 16x16 block stops refining once good enough
    (:mod:`codec.block_stops`; format 2 segments), and a tile ends when all its blocks have.
    ``refine_steps`` searches each code for a better one (:mod:`codec.refine`). With
    ``half_res`` the blocks are coded at half resolution (:mod:`codec.resolution`); errors are
    still measured on full-resolution pixels, as the decoder will produce them.

    The errors are measured on each tile decoded as every reader decodes it (alone, on one
    thread: :func:`decode_tile`), not on this batched pass, whose float sums run in another
    order and can round a rare pixel the other way: a quality floor met here is then met on
    the pixels readers see. A fixed iteration count needs no errors (``measure=False``).
    """
    tiles = [_normalise(block.pixels, block.peak) for block in blocks]
    if half_res:
        tiles = [resolution.halve(tile) for tile in tiles]
    stacked = np.stack([pad_tile(tile) for tile in tiles])
    x = torch.from_numpy(stacked[:, None]).to(model_device(loaded))
    stop_rule = None
    if stop_threshold_db is not None:
        valid = _valid_pixels([tile.shape for tile in tiles], stacked.shape[1:]).to(x.device)
        stop_rule = block_stop_rule(stop_threshold_db, valid)
    # The batched pass's reconstructions are not measured: the errors come from the readers'
    # decode below.
    codes, _ = loaded.model.compress(x, iterations, stop_rule, refine_steps)
    bits = [(code > 0).to(torch.uint8).cpu().numpy() for code in codes]
    active = [(code != 0).any(dim=1).cpu().numpy() for code in codes]
    coded = []
    for position in range(len(blocks)):
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
        coded.append(tile)
    if not measure:
        return coded

    def measure_tile(position: int) -> None:
        block, tile = blocks[position], coded[position]
        codes = [
            _network_code(bits[k][position], active[k][position]) for k in range(len(tile.segments))
        ]
        original = block.pixels.astype(np.float64)
        height, width = original.shape
        for decoded in _pixels_from_codes(
            loaded, codes, (height, width), half_res, block.bits_stored, every_iteration=True
        ):
            diff = original - decoded
            tile.squared_errors.append(float(np.sum(diff * diff)))
            if with_ssim and min(height, width) >= WINDOW:
                tile.ssims.append(ssim(block.pixels, decoded, block.bits_stored))

    map_tiles(measure_tile, range(len(blocks)))
    return coded


def _encode_tiles(
    image: GrayImage,
    boxes: list[TileBox],
    loaded: LoadedModel,
    iterations: int,
    with_ssim: bool,
    stop_threshold_db: float | None = None,
    refine_steps: int = 0,
    half_res: bool = False,
    measure: bool = True,
) -> list[EncodedTile]:
    blocks = [GrayImage(image.pixels[box.slices], image.bits_stored) for box in boxes]
    encoded: list[EncodedTile | None] = [None] * len(boxes)
    shapes = [_coded_shape(box, half_res) for box in boxes]
    for batch in batches_by_padded_shape(shapes, TILE_BATCH):
        coded = code_blocks(
            [blocks[i] for i in batch],
            loaded,
            iterations,
            with_ssim,
            stop_threshold_db,
            refine_steps,
            half_res,
            measure,
        )
        for index, tile in zip(batch, coded, strict=True):
            encoded[index] = tile
    return [tile for tile in encoded if tile is not None]


def _coded_shape(box: TileBox, half_res: bool) -> tuple[int, int]:
    """The size the network codes a tile at."""
    if half_res:
        return resolution.half_shape(box.height, box.width)
    return box.height, box.width


def _segment_costs(tile: EncodedTile) -> list[int]:
    """Bytes each iteration adds to a stream: its segment and its length in the tile table."""
    return [len(s) + bitstream.leb128_size(len(s)) for s in tile.segments]


def _choose_iterations(
    tiles: list[EncodedTile], boxes: list[TileBox], rate: RateControl, peak: int, budget: int
) -> tuple[list[int], bool]:
    """Iterations per tile, and whether the rate target or quality floor was met.

    ``budget`` is the bytes left for segments and their table entries under a bpp target.
    """
    if rate.iterations is not None:
        return [len(t.segments) for t in tiles], True
    if rate.bpp is not None:
        costs = [_segment_costs(t) for t in tiles]
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
    #: The same tiles coded at half resolution, when asked for: a bpp target then picks per
    #: tile whichever removes more error per byte.
    halves: list[EncodedTile] | None = None

    @property
    def iterations(self) -> int:
        """The most iterations any tile was coded to."""
        return max(len(tile.segments) for tile in self.tiles)

    @property
    def full_size(self) -> int:
        """Bytes of the stream that keeps every coded iteration."""
        segments = sum(sum(_segment_costs(tile)) for tile in self.tiles)
        return len(bitstream.pack(Stream(self.header, [[] for _ in self.boxes]))) + segments

    def squared_error(self, chosen: list[int], half_res: list[bool] | None = None) -> float:
        """Total squared error of the image when each tile keeps ``chosen`` iterations, at
        half resolution where ``half_res`` says so (an :class:`EncodeResult`'s fields)."""
        half = half_res or [False] * len(self.tiles)
        return sum(
            self._tile(index, half[index]).squared_errors[k - 1] for index, k in enumerate(chosen)
        )

    @property
    def measured(self) -> bool:
        """Whether each coded iteration's error was measured (not so with ``measure=False``)."""
        tiles = self.tiles + (self.halves or [])
        return all(len(tile.squared_errors) == len(tile.segments) for tile in tiles)

    def _tile(self, index: int, half_res: bool) -> EncodedTile:
        if half_res:
            if self.halves is None:
                raise ValueError("no tile was coded at half resolution")
            return self.halves[index]
        return self.tiles[index]

    def overhead(self, half_res: bool) -> int:
        """The container with no segments: what every stream of this image costs anyway."""
        empty = Stream(self.header, [[] for _ in self.boxes], [half_res] * len(self.boxes))
        return len(bitstream.pack(empty))

    def ladders(self, half_res: bool) -> list[list[Ladder]]:
        """Each tile's ways to be coded: full resolution, then half resolution if asked."""
        modes = (False, True) if half_res else (False,)
        ways = [[self._tile(i, half) for half in modes] for i in range(len(self.tiles))]
        return [[Ladder(_segment_costs(tile), tile.squared_errors) for tile in way] for way in ways]

    def stream(self, picks: list[tuple[int, int]]) -> tuple[EncodeResult, int]:
        """The stream in which tile ``i`` keeps ``picks[i] = (ladder, iterations)`` (ladder 1:
        half resolution; format 3 when any tile is), and the segment bytes that costs."""
        half = [ladder == 1 for ladder, _ in picks]
        chosen = [k for _, k in picks]
        coded = [self._tile(index, h) for index, h in enumerate(half)]
        spent = sum(sum(_segment_costs(t)[:k]) for t, k in zip(coded, chosen, strict=True))
        half = half if any(half) else []
        stream = Stream(
            self.header, [t.segments[:k] for t, k in zip(coded, chosen, strict=True)], half
        )
        return EncodeResult(bitstream.pack(stream), chosen, True, half), spent

    def select(self, rate: RateControl) -> EncodeResult:
        """The stream ``rate`` asks for (its iterations must not exceed those coded)."""
        if rate.iterations is not None and rate.iterations > self.iterations:
            raise ValueError("more iterations asked than were coded")
        if rate.iterations is None and not self.measured:
            raise ValueError("a bpp target or quality floor needs candidates coded with measure")
        if rate.half_res:
            if rate.bpp is None:
                raise ValueError("half-resolution tiles need a bpp target")
            (result,) = select_within_budget([self], rate.bpp, half_res=True)
            return result
        pixels = self.header.height * self.header.width
        budget = int((rate.bpp or 0) * pixels / 8) - self.overhead(False)
        tiles = (
            [EncodedTile(t.segments[: rate.iterations], [], []) for t in self.tiles]
            if rate.iterations is not None
            else self.tiles
        )
        chosen, met = _choose_iterations(tiles, self.boxes, rate, self.peak, budget)
        stream = Stream(self.header, [t.segments[:k] for t, k in zip(tiles, chosen, strict=True)])
        return EncodeResult(bitstream.pack(stream), chosen, met)


def select_within_budget(
    candidates: Sequence[TileCandidates], bpp: float, half_res: bool = False
) -> list[EncodeResult]:
    """One bpp budget shared by several coded images (the chunks of one radiograph, each its
    own stream): the bytes go wherever they remove the most squared error, across images, at
    full or (with ``half_res``) half resolution per tile. Each result's ``target_met`` says
    whether the streams together fit."""
    if half_res and any(c.halves is None for c in candidates):
        raise ValueError("half-resolution tiles need candidates coded at half resolution")
    pixels = sum(c.header.height * c.header.width for c in candidates)
    budget = int(bpp * pixels / 8) - sum(c.overhead(half_res) for c in candidates)
    ladders = [c.ladders(half_res) for c in candidates]
    picks = allocate_ladders([tile for image in ladders for tile in image], budget)
    results, spent, start = [], 0, 0
    for candidate, image in zip(candidates, ladders, strict=True):
        result, cost = candidate.stream(picks[start : start + len(image)])
        results.append(result)
        spent += cost
        start += len(image)
    return [replace(result, target_met=spent <= budget) for result in results]


def encode_candidates(
    image: GrayImage,
    iterations: int | None = None,
    model_id: str = DEFAULT_MODEL_ID,
    tile_size: int = DEFAULT_TILE_SIZE,
    with_ssim: bool = False,
    stop_threshold_db: float | None = None,
    refine_steps: int = 0,
    half_res: bool = False,
    measure: bool = True,
) -> TileCandidates:
    """Run the network once over every tile, to ``iterations`` (default: as trained); with
    ``stop_threshold_db``, blocks stop refining once good enough (a format 2 stream); with
    ``refine_steps``, each code is refined that many steps (:mod:`codec.refine`); with
    ``half_res``, every tile is also coded at half resolution (:mod:`codec.resolution`).
    ``measure=False`` skips decoding each tile to measure its errors: enough for a stream of
    fixed iterations, which needs none."""
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
    coding = (loaded, count, with_ssim, stop_threshold_db, refine_steps)
    tiles = _encode_tiles(image, boxes, *coding, measure=measure)
    halves = None
    if half_res:
        halves = _encode_tiles(image, boxes, *coding, half_res=True, measure=measure)
    return TileCandidates(header, boxes, tiles, image.peak, halves)


class AdaptiveCandidates:
    """One image coded with block stops at the thresholds a bpp target needs, cached so that
    several targets on one image (the bench's case) share network runs.

    Each target runs its own threshold search, so it picks among exactly the thresholds a
    single ``radiarc encode --bpp X --adaptive`` would try, and :meth:`network_seconds` says
    what coding those thresholds took: the encode time of that one command, cache or not.
    With ``refine_steps`` the search runs on plain codes and only its answers are coded
    refined (:func:`codec.block_stops.refined_thresholds`)."""

    def __init__(
        self,
        image: GrayImage,
        model_id: str = DEFAULT_MODEL_ID,
        tile_size: int = DEFAULT_TILE_SIZE,
        refine_steps: int = 0,
        half_res: bool = False,
    ) -> None:
        self.image = image
        self.model_id = model_id
        self.tile_size = tile_size
        self.refine_steps = refine_steps
        self.half_res = half_res
        # Keyed by (threshold, refinement steps): a refined search also codes plain streams.
        self._coded: dict[tuple[float, int], TileCandidates] = {}
        self._seconds: dict[tuple[float, int], float] = {}  # network and entropy coding
        self._searched: dict[float, set[tuple[float, int]]] = {}  # bpp -> what its search coded

    def at(self, threshold_db: float) -> TileCandidates:
        """The image coded at ``threshold_db`` with this object's refinement steps."""
        return self._at(threshold_db, self.refine_steps)

    def _at(self, threshold_db: float, refine_steps: int) -> TileCandidates:
        key = (threshold_db, refine_steps)
        if key not in self._coded:
            started = time.perf_counter()
            self._coded[key] = encode_candidates(
                self.image,
                None,
                self.model_id,
                self.tile_size,
                stop_threshold_db=threshold_db,
                refine_steps=refine_steps,
                half_res=self.half_res,
            )
            self._seconds[key] = time.perf_counter() - started
        return self._coded[key]

    def select(self, bpp: float) -> EncodeResult:
        """The stream with the least squared error among those not above ``bpp``; the
        thresholds are searched, and tiles may drop late iterations as in the uniform mode."""
        rate = RateControl(bpp=bpp, half_res=self.half_res)
        budget = int(bpp * self.image.pixels.size / 8)
        coded: set[tuple[float, int]] = set()

        def size(threshold: float, steps: int) -> int:
            coded.add((threshold, steps))
            return self._at(threshold, steps).full_size

        if self.refine_steps:
            thresholds = refined_thresholds(
                lambda t: size(t, 0), lambda t: size(t, self.refine_steps), budget
            )
        else:
            thresholds = ThresholdSearch(lambda t: size(t, 0)).run(budget)
        self._searched[bpp] = coded
        best: tuple[float, EncodeResult] | None = None
        for threshold in thresholds:
            candidates = self.at(threshold)
            result = candidates.select(rate)
            error = candidates.squared_error(result.tile_iterations, result.half_res)
            if best is None or (result.target_met, -error) > (best[1].target_met, -best[0]):
                best = (error, result)
        assert best is not None  # either search codes at least one threshold
        return best[1]

    def searched(self, bpp: float) -> list[tuple[float, int]]:
        """What :meth:`select` ``(bpp)`` coded: (threshold, refinement steps) pairs."""
        if bpp not in self._searched:
            raise KeyError(f"no stream was selected at {bpp} bpp")
        return sorted(self._searched[bpp])

    def network_seconds(self, bpp: float) -> float:
        """Seconds spent coding what :meth:`select` ``(bpp)`` searched, plain and refined."""
        return sum(self._seconds[key] for key in self.searched(bpp))


def encode_image(
    image: GrayImage,
    rate: RateControl,
    model_id: str = DEFAULT_MODEL_ID,
    tile_size: int = DEFAULT_TILE_SIZE,
    refine_steps: int = 0,
) -> EncodeResult:
    """Compress ``image`` into a Radiarc stream under ``rate``; ``refine_steps`` trades
    encoding time for quality at low rates (:mod:`codec.refine`)."""
    if rate.max_error is not None or rate.residual:
        # Imported here: codec.near_lossless builds on this module's encoder and decoder.
        from codec.near_lossless import ResidualCandidates

        if rate.max_error is not None:
            residual = ResidualCandidates.encode(
                image, model_id, tile_size, refine_steps=refine_steps
            )
            return residual.stream(rate.max_error)
        layered = ResidualCandidates.for_bpp(
            image, model_id, tile_size, rate.half_res, refine_steps
        )
        return layered.at_bpp(rate.bpp or 0.0)
    if rate.adaptive and rate.bpp is not None:
        adaptive = AdaptiveCandidates(image, model_id, tile_size, refine_steps, rate.half_res)
        return adaptive.select(rate.bpp)
    candidates = encode_candidates(
        image,
        rate.iterations,
        model_id,
        tile_size,
        with_ssim=rate.min_ssim is not None,
        refine_steps=refine_steps,
        half_res=rate.half_res,
        measure=rate.iterations is None,
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
        codes.append(_network_code(bits, active))
        previous, previous_active = bits, active
    return codes


def _network_code(bits: np.ndarray, active: np.ndarray) -> np.ndarray:
    """An iteration's code as the network reads it: +-1 in refined blocks, 0 in stopped ones."""
    return (bits.astype(np.float32) * 2 - 1) * active


def _pixel_dtype(bits_stored: int) -> np.dtype:
    return np.dtype(np.uint8 if bits_stored <= 8 else np.uint16)


def _pixels_from_codes(
    loaded: LoadedModel,
    codes: list[np.ndarray],
    shape: tuple[int, int],
    half_res: bool,
    bits_stored: int,
    every_iteration: bool = False,
) -> list[np.ndarray]:
    """A ``shape`` tile's pixels from its codes: the network on the tile alone (one call of
    batch one, so the sums run in the same order on every machine and thread count)."""
    peak = peak_value(bits_stored)
    layers = [torch.from_numpy(code[np.newaxis]).to(model_device(loaded)) for code in codes]
    reconstructions = loaded.model.decompress(layers)
    pixels = []
    first = 1 if every_iteration else len(reconstructions)
    for count, reconstruction in enumerate(reconstructions[first - 1 :], start=first):
        if half_res:
            reconstruction = resolution.double(reconstruction, loaded.upsampler, count)
        decoded = _to_pixels(reconstruction[0, 0], peak, _pixel_dtype(bits_stored))
        pixels.append(decoded[: shape[0], : shape[1]])
    return pixels


def decode_tile(
    loaded: LoadedModel,
    header: StreamHeader,
    box: TileBox,
    half_res: bool,
    segments: list[bytes],
    every_iteration: bool = False,
) -> list[np.ndarray]:
    """A tile's pixels after its last iteration (or, ``every_iteration``, after each), as
    every reader decodes them: the tile alone in one network call (run it on one intra-op
    thread, as :func:`codec.tile_threads.map_tiles` does, for the same pixels everywhere).
    With no segments (a tile whose residual layer codes it alone), mid-grey."""
    if not segments:
        peak = peak_value(header.bits_stored)
        shape = (box.height, box.width)
        return [np.full(shape, (peak + 1) // 2, dtype=_pixel_dtype(header.bits_stored))]
    padded = TileBox(0, 0, *_coded_shape(box, half_res)).padded_shape
    code_shape = (header.code_channels, padded[0] // 16, padded[1] // 16)
    codes = _decode_codes(segments, code_shape, loaded, header.block_stops)
    return _pixels_from_codes(
        loaded, codes, (box.height, box.width), half_res, header.bits_stored, every_iteration
    )


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
    dtype = _pixel_dtype(header.bits_stored)
    output = np.zeros((rows[1] - rows[0], cols[1] - cols[0]), dtype=dtype)
    kept = {i: stream.tiles[i][:iterations] if iterations else stream.tiles[i] for i in wanted}
    if any(not kept[i] and stream.residual(i) is None for i in wanted):
        raise BitstreamError("a tile has no iterations and no residual layer")
    most = loaded.model.config.max_iterations
    if any(len(segments) > most for segments in kept.values()):
        raise BitstreamError(f"a tile has more iterations than the model's {most}")

    def decode(index: int) -> np.ndarray:
        box, segments = boxes[index], kept[index]
        pixels = decode_tile(loaded, header, box, stream.is_half_res(index), segments)[-1]
        if not stream.checks_pixels(index) or len(segments) < len(stream.tiles[index]):
            return pixels  # no correction, or a prefix of iterations it does not correct
        shape = (box.height, box.width)
        coarse = stream.coarse_segment(index)
        if coarse is not None:
            pixels = apply_correction(pixels, decode_coarse(coarse, shape, peak), peak)
        residual = stream.residual(index)
        bound = ""
        if residual is not None:
            layer, max_error, _ = residual
            coder = stream.residual_coder
            indices = decode_residual(layer, shape, coder)
            pixels = reconstruct(pixels, indices, max_error, peak, smoothed(layer, coder))
            bound = (
                f"; its pixels could be off the max error {layer_bound(layer, max_error, coder)}"
            )
        if bitstream.pixels_crc(pixels) != stream.pixel_crcs[index]:
            raise BitstreamError(
                f"tile {index} decodes to other pixels than its encoder's (pixel checksum): "
                "this machine's network arithmetic differs from the writer's, or the layer was "
                f"altered{bound} (docs/bitstream.md, versions 4 to 6)"
            )
        return pixels

    # One tile per network call, on one thread each: the pixels then never depend on which
    # tiles share a batch (a region against the whole image) or on the thread count.
    for index, pixels in zip(wanted, map_tiles(decode, wanted), strict=True):
        box = boxes[index]
        top, left = max(box.top, rows[0]), max(box.left, cols[0])
        bottom = min(box.top + box.height, rows[1])
        right = min(box.left + box.width, cols[1])
        output[top - rows[0] : bottom - rows[0], left - cols[0] : right - cols[0]] = pixels[
            top - box.top : bottom - box.top, left - box.left : right - box.left
        ]
    return GrayImage(output, header.bits_stored)
