"""Streams whose every pixel is within D of the original: network iterations, then a residual
layer (:mod:`codec.residual`); D = 0 is lossless.

Per tile, the network's first ``k`` iterations predict and the layer codes what they leave with
a step of ``2D + 1``. Which ``k`` is cheapest depends on the tile and on D, so the encoder codes
the layer on each ``k`` in :data:`BASE_ITERATIONS` and keeps the smallest tile. ``k = 0`` (no
network: the layer codes the tile against mid-grey) is among them because measurement says so:
the layer's interpolating predictor codes a radiograph losslessly in fewer bits than it codes
what one network iteration leaves (2.24 against 2.49 bpp on an 8-bit chest X-ray), while near
lossless (D >= 2) and at bpp targets the network's iterations pay (docs/codec.md, "Stop 11").
The residual is taken against the decoder's own pixels (:func:`codec.learned.decode_tile`, one
tile per network call on one thread, as every reader runs it), so the bound holds for what
readers get.

A bpp target gives each tile whichever coding removes the most squared error per byte: the
network's iterations alone (best at the lowest rates) or a residual layer with some D on its
cheapest base; a stream may mix them, and its layers may have different bounds. This reaches the
rates a 10-iteration network cannot (2-4 bpp on high-bit DICOMs) and, from about 0.25 bpp on
chest radiographs, beats the network alone (docs/codec.md, "Stop 11").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from codec import bitstream
from codec.bitstream import Stream, leb128_size, pixels_crc
from codec.io import GrayImage
from codec.learned import (
    DEFAULT_TILE_SIZE,
    EncodeResult,
    TileCandidates,
    decode_tile,
    encode_candidates,
)
from codec.rate import Ladder, allocate_ladders
from codec.residual import encode_residual, estimated_bits, quantize, reconstruct
from codec.tile_threads import map_tiles
from codec.weights import DEFAULT_MODEL_ID, load_model

BASE_ITERATIONS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class _LayeredTile:
    iterations: int
    residual: bytes
    max_error: int
    pixel_crc: int  # of the pixels the tile decodes to
    squared_error: float
    #: Bytes the tile adds to a version 5 container whose table already holds a one-byte
    #: residual length and max error for it: segments, their lengths, the layer, and any
    #: longer LEB128 fields.
    size: int
    smoothed: bool = False  # the decoder smooths the layer: pixels within 2 max_error

    @property
    def bound(self) -> int:
        """The largest pixel error the tile allows."""
        return 2 * self.max_error if self.smoothed else self.max_error


def ladder_max_errors(peak: int) -> list[int]:
    """The max errors a bpp target chooses among, loosest first: steps of about sqrt(2) from
    0 to an eighth of the peak (looser bounds cost more than the network's own iterations)."""
    errors = {0} | {round(2 ** (i / 2)) for i in range(2 * peak.bit_length())}
    return sorted((e for e in errors if e <= max(peak // 8, 1)), reverse=True)


@dataclass(frozen=True)
class _Choice:
    """How one tile is coded: its iterations, at half resolution or not, and its layer."""

    iterations: int
    layer: _LayeredTile | None = None
    half_res: bool = False


@dataclass
class ResidualCandidates:
    """An image's tiles coded by the network, and the pixels a reader gets after each of
    :data:`BASE_ITERATIONS`: a stream for any D is a residual layer on one of them per tile."""

    image: GrayImage
    candidates: TileCandidates
    bases: list[list[np.ndarray]]  # per tile, the decoded pixels after each base iteration count
    base_iterations: tuple[int, ...]
    #: A bpp target may also code a tile at half resolution by the network alone (the
    #: candidates then hold the halves too): the lowest rates' best coding.
    half_res: bool = False
    _layered: dict[tuple[int, int, bool], _LayeredTile] = field(default_factory=dict)
    layer_seconds: float = 0.0  # spent coding residual layers so far (each tile and D once)

    @classmethod
    def encode(
        cls,
        image: GrayImage,
        model_id: str = DEFAULT_MODEL_ID,
        tile_size: int = DEFAULT_TILE_SIZE,
        base_iterations: Sequence[int] = BASE_ITERATIONS,
        network_iterations: int | None = None,
        half_res: bool = False,
    ) -> ResidualCandidates:
        """Code every tile to ``network_iterations`` (default: the most base iterations; for
        a bpp target, which also weighs the network alone, :meth:`for_bpp` codes as many as
        the model was trained for) and decode each base as readers will."""
        loaded = load_model(model_id)
        counts = tuple(sorted(set(base_iterations)))
        if not counts or counts[0] < 0 or counts[-1] > loaded.model.config.max_iterations:
            raise ValueError(f"base iterations {base_iterations} outside {model_id}'s range")
        coded = max(network_iterations or counts[-1], counts[-1], 1)
        candidates = encode_candidates(image, coded, model_id, tile_size, half_res=half_res)
        header = candidates.header

        def decoded(index: int) -> list[np.ndarray]:
            box, segments = candidates.boxes[index], candidates.tiles[index].segments
            every = decode_tile(loaded, header, box, False, segments[: max(counts[-1], 1)], True)
            flat = decode_tile(loaded, header, box, False, [])[0]
            return [every[k - 1] if k else flat for k in counts]

        bases = map_tiles(decoded, list(range(len(candidates.boxes))))
        return cls(image, candidates, bases, counts, half_res)

    @classmethod
    def for_bpp(
        cls,
        image: GrayImage,
        model_id: str = DEFAULT_MODEL_ID,
        tile_size: int = DEFAULT_TILE_SIZE,
        half_res: bool = False,
    ) -> ResidualCandidates:
        """Candidates for :meth:`at_bpp`: the network ladder to its trained iterations, and
        with ``half_res`` at half resolution too."""
        trained = load_model(model_id).trained_iterations
        return cls.encode(image, model_id, tile_size, network_iterations=trained, half_res=half_res)

    def _tile(self, index: int, max_error: int, smoothing: bool = False) -> _LayeredTile:
        """The tile's smallest coding: the base iterations after which the layer is estimated
        to cost least (:func:`codec.residual.estimated_bits`); with ``smoothing`` (bpp
        targets, not bounds), smoothed where that removes squared error."""
        if (index, max_error, smoothing) in self._layered:
            return self._layered[index, max_error, smoothing]
        started = time.perf_counter()
        box = self.candidates.boxes[index]
        original = self.image.pixels[box.slices].astype(np.int64)
        segments = self.candidates.tiles[index].segments

        def segment_bytes(k: int) -> int:
            return sum(len(s) + leb128_size(len(s)) for s in segments[:k])

        # The base whose layer is estimated smallest; only that layer is really coded (the
        # coder costs five estimates' time, and ranks bases much as they estimate).
        options = [
            (segment_bytes(k) + estimated_bits(quantize(original - base, max_error)) / 8, k, base)
            for k, base in zip(self.base_iterations, self.bases[index], strict=True)
        ]
        _, k, base = min(options, key=lambda option: option[0])
        indices = quantize(original - base, max_error)
        pixels = reconstruct(base, indices, max_error, self.image.peak)
        error, smooth = float(np.sum((original - pixels) ** 2)), False
        if smoothing and max_error:
            smoothed = reconstruct(base, indices, max_error, self.image.peak, smooth=True)
            smoothed_error = float(np.sum((original - smoothed) ** 2))
            if smoothed_error < error:
                pixels, error, smooth = smoothed, smoothed_error, True
        residual = encode_residual(indices, smooth=smooth)
        size = segment_bytes(k) + len(residual)
        size += leb128_size(len(residual)) - 1 + leb128_size(max_error) - 1
        crc = pixels_crc(pixels)
        tile = _LayeredTile(k, residual, max_error, crc, error, size, smooth)
        self._layered[index, max_error, smoothing] = tile
        self.layer_seconds += time.perf_counter() - started
        return tile

    def _overhead(self) -> int:
        """The version 5 container with no segments and one-byte layer fields per tile."""
        tiles = len(self.candidates.boxes)
        empty = Stream(
            self.candidates.header,
            [[] for _ in range(tiles)],
            residuals=[b"\0"] * tiles,
            max_errors=[0] * tiles,
            pixel_crcs=[0] * tiles,
        )
        return len(bitstream.pack(empty)) - tiles

    def _pack(self, choices: list[_Choice]) -> bytes:
        """The stream in which each tile is coded as ``choices`` says."""
        tiles = self.candidates.tiles
        halves = self.candidates.halves or tiles
        segments = [
            (halves if choice.half_res else tiles)[index].segments[: choice.iterations]
            for index, choice in enumerate(choices)
        ]
        half = [choice.half_res for choice in choices] if any(c.half_res for c in choices) else []
        layers = [choice.layer for choice in choices]
        if all(layer is None for layer in layers):
            return bitstream.pack(Stream(self.candidates.header, segments, half))
        stream = Stream(
            self.candidates.header,
            segments,
            half,
            residuals=[b"" if layer is None else layer.residual for layer in layers],
            max_errors=[0 if layer is None else layer.max_error for layer in layers],
            pixel_crcs=[0 if layer is None else layer.pixel_crc for layer in layers],
        )
        return bitstream.pack(stream)

    def stream(self, max_error: int) -> EncodeResult:
        """The stream in which no pixel is off by more than ``max_error``."""
        if not 0 <= max_error < self.image.peak + 1:
            raise ValueError(f"max error must be in 0..{self.image.peak}, got {max_error}")
        tiles = [self._tile(index, max_error) for index in range(len(self.candidates.boxes))]
        data = self._pack([_Choice(tile.iterations, tile) for tile in tiles])
        return EncodeResult(data, [tile.iterations for tile in tiles], True, max_error=max_error)

    def ladders(self) -> list[list[Ladder]]:
        """Per tile, the ways to spend bytes: the network's iterations alone (at full, and
        with ``half_res`` at half resolution), and residual layers of
        :func:`ladder_max_errors` (each on its cheapest full-resolution base), last."""
        errors = ladder_max_errors(self.image.peak)
        ways = []
        for index, network in enumerate(self.candidates.ladders(half_res=self.half_res)):
            layers = [self._tile(index, error, smoothing=True) for error in errors]
            totals = [layer.size for layer in layers]
            costs = [b - a for a, b in zip([0, *totals], totals, strict=False)]
            ways.append([*network, Ladder(costs, [layer.squared_error for layer in layers])])
        return ways

    def _choices(self, picks: list[tuple[int, int]]) -> list[_Choice]:
        """The allocator's picks over :meth:`ladders` as tile codings."""
        errors = ladder_max_errors(self.image.peak)
        layered_way = 2 if self.half_res else 1  # after the network's ways
        choices: list[_Choice] = []
        for index, (way, step) in enumerate(picks):
            if way == layered_way:
                layer = self._tile(index, errors[step - 1], smoothing=True)
                choices.append(_Choice(layer.iterations, layer))
            else:
                choices.append(_Choice(step, half_res=way == 1))
        return choices

    def _result(self, choices: list[_Choice], fits: bool) -> EncodeResult:
        layers = [choice.layer for choice in choices if choice.layer is not None]
        bound = max(layer.bound for layer in layers) if len(layers) == len(choices) else None
        half = [choice.half_res for choice in choices]
        return EncodeResult(
            self._pack(choices),
            [choice.iterations for choice in choices],
            fits,
            half if any(half) else [],
            max_error=bound,
        )

    def at_bpp(self, bpp: float) -> EncodeResult:
        """The stream that fits ``bpp`` with the least squared error (see
        :func:`select_layered`)."""
        (result,) = select_layered([self], bpp)
        return result


def select_layered(images: Sequence[ResidualCandidates], bpp: float) -> list[EncodeResult]:
    """One bpp budget (``bpp`` times all the images' pixels) over several coded images (an
    image's chunks, each its own stream): each tile coded by the network alone or with a
    residual layer, whichever the bytes buy more with (the allocation of
    :func:`codec.rate.allocate_ladders`), then bounds tightened with what is left. A result's
    ``max_error`` is its largest bound when all its tiles have a layer; ``target_met`` says
    whether the streams together fit."""
    budget = int(bpp * sum(image.image.pixels.size for image in images) / 8)
    ladders = [image.ladders() for image in images]
    overhead = sum(image._overhead() for image in images)
    picks = allocate_ladders([tile for image in ladders for tile in image], budget - overhead)
    choices, start = [], 0
    for image, tiles in zip(images, ladders, strict=True):
        choices.append(image._choices(picks[start : start + len(tiles)]))
        start += len(tiles)
    choices = _tighten(images, choices, budget)
    fits = _spent(images, choices) <= budget
    return [image._result(chosen, fits) for image, chosen in zip(images, choices, strict=True)]


def _spent(images: Sequence[ResidualCandidates], choices: list[list[_Choice]]) -> int:
    return sum(len(image._pack(chosen)) for image, chosen in zip(images, choices, strict=True))


def _tighten(
    images: Sequence[ResidualCandidates], choices: list[list[_Choice]], budget: int
) -> list[list[_Choice]]:
    """Spend what the allocation left on bounds between the ladder's steps: lower one layered
    tile's max error by one level at a time, where that removes the most error per byte, while
    the streams fit (one large tile, a small image, would otherwise stop a whole sqrt(2) step
    short of its budget)."""
    choices = [list(chosen) for chosen in choices]
    while True:
        spent = _spent(images, choices)
        options = []
        for number, (image, chosen) in enumerate(zip(images, choices, strict=True)):
            for index, choice in enumerate(chosen):
                layer = choice.layer
                if layer is None or layer.max_error == 0:
                    continue
                tighter = image._tile(index, layer.max_error - 1, smoothing=True)
                extra = tighter.size - layer.size
                gain = layer.squared_error - tighter.squared_error
                if spent + extra <= budget and gain > 0:
                    options.append((gain / max(extra, 1), number, index, tighter))
        if not options:
            return choices
        _, number, index, tighter = max(options, key=lambda option: option[0])
        choices[number][index] = _Choice(tighter.iterations, tighter)
