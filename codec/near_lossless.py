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

A bpp target also weighs coarse corrections (:mod:`codec.coarse`: block means of what the
network left, added back bilinearly; format 6): over 1-4 network iterations alone, as ways of
their own (:data:`COARSE_OPTIONS`), and under residual layers (:data:`LAYER_COARSE_OPTIONS`),
where a coarse layer would otherwise round away the slow shading error below its D
(docs/codec.md, "Stop 13"). A max error of 3 or more weighs them too, by estimate, and codes
one layer per tile (stop 14).

A bpp target codes only the layers its allocation can use (:func:`_allocate_lazily`): most
of its time is spent coding layers (docs/codec.md, "Stop 14").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from codec import bitstream, coarse
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
#: The coarse corrections (block side, step) a bpp target offers over 1-4 network iterations:
#: each is a way of its own in the allocation, so a tile takes at most one. Steps are in the
#: image's levels; deeper images are offered them in 8-bit levels too (``_in_levels``).
COARSE_OPTIONS = ((16, 2), (8, 2), (8, 1), (4, 3))
#: Under residual layers: none, 8x8 or 4x4 blocks at step 3. A coarse layer (large D) rounds
#: away the slow shading error below D that a correction removes first (on a val image's tile at
#: D = 11, mean squared error 13.7 -> 7.6 with 10% fewer bytes; docs/codec.md, "Stop 13").
LAYER_COARSE_OPTIONS: tuple[tuple[int, int] | None, ...] = (None, (8, 3), (4, 3))


@dataclass(frozen=True)
class _LayeredTile:
    iterations: int
    residual: bytes
    max_error: int
    pixel_crc: int  # of the pixels the tile decodes to
    squared_error: float
    #: Bytes the tile adds to a container whose table already holds a one-byte residual
    #: length, max error and coarse length for it: segments, their lengths, the layer, any
    #: coarse segment, and any longer LEB128 fields.
    size: int
    smoothed: bool = False  # the decoder smooths the layer: pixels within 2 max_error
    #: The coarse correction under the layer, as (block side, step), and its segment.
    coarse_option: tuple[int, int] | None = None
    coarse: bytes = b""

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
class _CoarseTile:
    """A tile's first iterations and the coarse correction of what they left."""

    iterations: int
    segment: bytes
    pixel_crc: int
    squared_error: float
    size: int  # bytes of the tile's iterations, the segment and its length field


@dataclass(frozen=True)
class _Choice:
    """How one tile is coded: its iterations, at half resolution or not, and its layer or
    its coarse correction."""

    iterations: int
    layer: _LayeredTile | None = None
    half_res: bool = False
    coarse: _CoarseTile | None = None


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
    #: With ``half_res``, per tile the pixels after each base iteration count of the
    #: half-resolution coding (None for 0), which coarse corrections may also correct.
    half_bases: list[list[np.ndarray | None]] = field(default_factory=list)
    #: The coarse corrections a bpp target weighs, as (block side, step); () for none.
    coarse_options: tuple[tuple[int, int], ...] = COARSE_OPTIONS
    #: Coarse corrections under layers a bpp target weighs (:data:`LAYER_COARSE_OPTIONS`).
    layer_coarse_options: tuple[tuple[int, int] | None, ...] = LAYER_COARSE_OPTIONS
    _layered: dict[tuple[int, int, bool, tuple[int, int] | None], _LayeredTile] = field(
        default_factory=dict
    )
    _coarse: dict[tuple[int, int, int, int, bool], _CoarseTile] = field(default_factory=dict)
    _corrections: dict[tuple[int, int, int, int, bool], tuple[np.ndarray, bytes]] = field(
        default_factory=dict
    )
    _estimates: dict[tuple[int, int, int, tuple[int, int] | None], float] = field(
        default_factory=dict
    )
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
        refine_steps: int = 0,
    ) -> ResidualCandidates:
        """Code every tile to ``network_iterations`` (default: the most base iterations; for
        a bpp target, which also weighs the network alone, :meth:`for_bpp` codes as many as
        the model was trained for) and decode each base as readers will. ``refine_steps``
        refines the network's codes (:mod:`codec.refine`): better bases, smaller layers."""
        loaded = load_model(model_id)
        counts = tuple(sorted(set(base_iterations)))
        if not counts or counts[0] < 0 or counts[-1] > loaded.model.config.max_iterations:
            raise ValueError(f"base iterations {base_iterations} outside {model_id}'s range")
        coded = max(network_iterations or counts[-1], counts[-1], 1)
        candidates = encode_candidates(
            image, coded, model_id, tile_size, refine_steps=refine_steps, half_res=half_res
        )
        header = candidates.header

        def decoded(index: int) -> list[np.ndarray]:
            box, segments = candidates.boxes[index], candidates.tiles[index].segments
            every = decode_tile(loaded, header, box, False, segments[: max(counts[-1], 1)], True)
            flat = decode_tile(loaded, header, box, False, [])[0]
            return [every[k - 1] if k else flat for k in counts]

        def decoded_halves(index: int) -> list[np.ndarray | None]:
            assert candidates.halves is not None
            box, segments = candidates.boxes[index], candidates.halves[index].segments
            every = decode_tile(loaded, header, box, True, segments[: counts[-1]], True)
            return [every[k - 1] if 0 < k <= len(every) else None for k in counts]

        tiles = list(range(len(candidates.boxes)))
        bases = map_tiles(decoded, tiles)
        halves = map_tiles(decoded_halves, tiles) if half_res else []
        return cls(image, candidates, bases, counts, half_res, halves)

    @classmethod
    def for_bpp(
        cls,
        image: GrayImage,
        model_id: str = DEFAULT_MODEL_ID,
        tile_size: int = DEFAULT_TILE_SIZE,
        half_res: bool = False,
        refine_steps: int = 0,
    ) -> ResidualCandidates:
        """Candidates for :meth:`at_bpp`: the network ladder to its trained iterations, and
        with ``half_res`` at half resolution too (codes refined ``refine_steps`` steps)."""
        trained = load_model(model_id).trained_iterations
        return cls.encode(
            image,
            model_id,
            tile_size,
            network_iterations=trained,
            half_res=half_res,
            refine_steps=refine_steps,
        )

    def _tile(
        self,
        index: int,
        max_error: int,
        smoothing: bool = False,
        coarse_option: tuple[int, int] | None = None,
    ) -> _LayeredTile:
        """The tile's smallest coding: the base iterations after which the layer is estimated
        to cost least (:func:`codec.residual.estimated_bits`); with ``smoothing`` (bpp
        targets, not bounds), smoothed where that removes squared error; with
        ``coarse_option``, on the bases after a coarse correction (:mod:`codec.coarse`)."""
        key = (index, max_error, smoothing, coarse_option)
        if key in self._layered:
            return self._layered[key]
        # The base whose layer is estimated smallest; only that layer is really coded (the
        # coder costs five estimates' time, and ranks bases much as they estimate).
        start = self._looser_iterations(index, max_error, coarse_option) if smoothing else None
        started = time.perf_counter()  # after the looser layer, which counts its own time
        box = self.candidates.boxes[index]
        original = self.image.pixels[box.slices].astype(np.int64)
        _, k = self._cheapest_base(index, max_error, coarse_option, start)
        base, coarse_segment = self._base(index, k, coarse_option)
        indices = quantize(original - base, max_error)
        pixels = reconstruct(base, indices, max_error, self.image.peak)
        error, smooth = float(np.sum((original - pixels) ** 2)), False
        if smoothing and max_error:
            smoothed = reconstruct(base, indices, max_error, self.image.peak, smooth=True)
            smoothed_error = float(np.sum((original - smoothed) ** 2))
            if smoothed_error < error:
                pixels, error, smooth = smoothed, smoothed_error, True
        residual = encode_residual(indices, smooth=smooth)
        size = self._segment_bytes(index, k) + len(residual) + len(coarse_segment)
        size += leb128_size(len(residual)) - 1 + leb128_size(max_error) - 1
        size += leb128_size(len(coarse_segment)) - 1
        crc = pixels_crc(pixels)
        tile = _LayeredTile(
            k, residual, max_error, crc, error, size, smooth, coarse_option, coarse_segment
        )
        self._layered[key] = tile
        self.layer_seconds += time.perf_counter() - started
        return tile

    def _estimate(
        self, index: int, iterations: int, max_error: int, coarse_option: tuple[int, int] | None
    ) -> float:
        """About the bytes of the tile's layer at ``max_error`` on ``iterations`` (and
        ``coarse_option``): segments, correction and :func:`codec.residual.estimated_bits`."""
        key = (index, iterations, max_error, coarse_option)
        if key not in self._estimates:
            original = self.image.pixels[self.candidates.boxes[index].slices].astype(np.int64)
            base, segment = self._base(index, iterations, coarse_option)
            bits = estimated_bits(quantize(original - base, max_error))
            self._estimates[key] = self._segment_bytes(index, iterations) + len(segment) + bits / 8
        return self._estimates[key]

    def _cheapest_base(
        self,
        index: int,
        max_error: int,
        coarse_option: tuple[int, int] | None,
        start: int | None,
    ) -> tuple[float, int]:
        """The estimated bytes and base iterations of the tile's layer at ``max_error`` on
        the base estimated smallest: among all bases, or with ``start`` by descent from it
        over 1-4 iterations, then against no iterations. The estimate is unimodal in the
        iterations (one minimum over 1-4 in 240 ladder rungs of two radiographs), so descent
        finds the same base from 2.8 estimates a rung instead of 4.3."""

        def cost(k: int) -> tuple[float, int]:
            return self._estimate(index, k, max_error, coarse_option), k

        counts = [k for k in self.base_iterations if k or coarse_option is None]
        network = [k for k in counts if k]
        if start is None or not network:
            return min(map(cost, counts))
        k = min(max(start, network[0]), network[-1])
        for move in (1, -1):  # climb to more iterations, or else to fewer
            moved = k
            while moved + move in network and cost(moved + move) < cost(moved):
                moved += move
            if moved != k:
                k = moved
                break
        return min(map(cost, [k, 0] if 0 in counts else [k]))

    def _looser_iterations(
        self, index: int, max_error: int, coarse_option: tuple[int, int] | None
    ) -> int | None:
        """The base iterations of the tile's layer at the next looser max error of the bpp
        ladder (None at the loosest): where the search for this one's starts. A function of
        the tile and ``max_error`` alone, so streams do not depend on what was coded first."""
        looser = [e for e in ladder_max_errors(self.image.peak) if e > max_error]
        if not looser:
            return None
        return self._tile(index, min(looser), True, coarse_option).iterations

    def _segment_bytes(self, index: int, iterations: int, half_res: bool = False) -> int:
        tiles = self.candidates.halves if half_res else self.candidates.tiles
        assert tiles is not None
        segments = tiles[index].segments[:iterations]
        return sum(len(s) + leb128_size(len(s)) for s in segments)

    def _correction(
        self, index: int, iterations: int, factor: int, step: int, half_res: bool = False
    ) -> tuple[np.ndarray, bytes]:
        """The tile's pixels after ``iterations`` (at half resolution or full) and a coarse
        correction (:mod:`codec.coarse`), and the correction's segment."""
        key = (index, iterations, factor, step, half_res)
        if key not in self._corrections:
            box = self.candidates.boxes[index]
            original = self.image.pixels[box.slices].astype(np.int64)
            bases = self.half_bases if half_res else self.bases
            base = bases[index][self.base_iterations.index(iterations)]
            assert base is not None  # only iterations the tile has are offered
            indices = coarse.quantize_means(original - base, factor, step)
            addition = coarse.correction(indices, factor, step, base.shape)
            pixels = coarse.apply_correction(base, addition, self.image.peak)
            self._corrections[key] = (pixels, coarse.encode_coarse(indices, factor, step))
        return self._corrections[key]

    def _base(
        self, index: int, iterations: int, coarse_option: tuple[int, int] | None
    ) -> tuple[np.ndarray, bytes]:
        """A full-resolution base for a layer, with its coarse segment (``b""``: none)."""
        if coarse_option is None:
            return self.bases[index][self.base_iterations.index(iterations)], b""
        return self._correction(index, iterations, *coarse_option)

    def _corrected(
        self, index: int, iterations: int, factor: int, step: int, half_res: bool = False
    ) -> _CoarseTile:
        """The tile after ``iterations`` (at half resolution or full) with a coarse
        correction, as a coding of its own."""
        key = (index, iterations, factor, step, half_res)
        if key not in self._coarse:
            started = time.perf_counter()
            box = self.candidates.boxes[index]
            original = self.image.pixels[box.slices].astype(np.int64)
            pixels, segment = self._correction(index, iterations, factor, step, half_res)
            size = self._segment_bytes(index, iterations, half_res) + len(segment)
            size += leb128_size(len(segment)) - 1  # the table holds one byte for it anyway
            error = float(np.sum((original - pixels) ** 2))
            self._coarse[key] = _CoarseTile(iterations, segment, pixels_crc(pixels), error, size)
            self.layer_seconds += time.perf_counter() - started
        return self._coarse[key]

    def _coarse_iterations(self) -> list[int]:
        return [k for k in self.base_iterations if k >= 1]

    def _in_levels(self, options: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """``options`` (steps in levels of the image), and for images deeper than 8 bits the
        same with steps in 8-bit levels too: which suits a tile depends on it (probe on the
        10- and 15-bit DICOMs at 0.25 bpp: either could be 0.5-1.2 dB better than the other,
        docs/codec.md, "Stop 13")."""
        scale = (self.image.peak + 1) >> 8
        if scale <= 1:
            return list(options)
        return [*options, *((factor, step * scale) for factor, step in options)]

    def _coarse_ways(self) -> list[tuple[int, int, bool]]:
        """(block side, step, half resolution) of each coarse way, in ladder order."""
        modes = (False, True) if self.half_res else (False,)
        options = self._in_levels(self.coarse_options)
        return [(factor, step, half) for half in modes for factor, step in options]

    def _layer_options(self) -> list[tuple[int, int] | None]:
        """The coarse corrections under layers, in ladder order (None: none)."""
        corrections = [option for option in self.layer_coarse_options if option is not None]
        plain: list[tuple[int, int] | None] = [None] if None in self.layer_coarse_options else []
        return [*plain, *self._in_levels(corrections)]

    def _overhead(self) -> int:
        """The version 6 container with no segments and one-byte layer and correction fields
        per tile (a stream with neither is a few bytes smaller)."""
        tiles = len(self.candidates.boxes)
        empty = Stream(
            self.candidates.header,
            [[] for _ in range(tiles)],
            residuals=[b"\0"] * tiles,
            max_errors=[0] * tiles,
            pixel_crcs=[0] * tiles,
            coarse=[b"\0"] * tiles,
        )
        return len(bitstream.pack(empty)) - 2 * tiles

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
        corrections = [
            choice.coarse.segment if choice.coarse else choice.layer.coarse if choice.layer else b""
            for choice in choices
        ]
        if all(layer is None for layer in layers) and not any(corrections):
            return bitstream.pack(Stream(self.candidates.header, segments, half))
        crcs = [
            choice.layer.pixel_crc
            if choice.layer
            else choice.coarse.pixel_crc
            if choice.coarse
            else 0
            for choice in choices
        ]
        stream = Stream(
            self.candidates.header,
            segments,
            half,
            residuals=[b"" if layer is None else layer.residual for layer in layers],
            max_errors=[0 if layer is None else layer.max_error for layer in layers],
            pixel_crcs=crcs,
            coarse=corrections if any(corrections) else [],
        )
        return bitstream.pack(stream)

    def stream(self, max_error: int) -> EncodeResult:
        """The stream in which no pixel is off by more than ``max_error``."""
        if not 0 <= max_error < self.image.peak + 1:
            raise ValueError(f"max error must be in 0..{self.image.peak}, got {max_error}")
        tiles = [self._bounded(index, max_error) for index in range(len(self.candidates.boxes))]
        data = self._pack([_Choice(tile.iterations, tile) for tile in tiles])
        return EncodeResult(data, [tile.iterations for tile in tiles], True, max_error=max_error)

    def _bounded(self, index: int, max_error: int) -> _LayeredTile:
        """The tile's smallest coding within ``max_error``: a layer on its cheapest base,
        over a coarse correction (of :meth:`_layer_options`, whose step is at most
        ``max_error``) or none, whichever is estimated smallest (the truly smallest on all
        40 tiles and bounds of two radiographs); only that layer is coded. Lossless and
        D < 3 take no correction; D = 3-8 are 4-18% smaller on 8-bit chest X-rays
        (docs/codec.md, "Stop 14")."""
        started = time.perf_counter()
        options = [None, *(o for o in self._layer_options() if _corrects_under(o, max_error))]
        _, option = min(
            (self._cheapest_base(index, max_error, option, None), number)
            for number, option in enumerate(options)
        )
        self.layer_seconds += time.perf_counter() - started
        return self._tile(index, max_error, coarse_option=options[option])

    def cheapest(self) -> list[int]:
        """Per tile, the bytes of its cheapest coding: one network iteration or the loosest
        layer (the first rung of every ladder; corrections come on top of an iteration)."""
        loosest = ladder_max_errors(self.image.peak)[0]
        ways = self.candidates.ladders(half_res=self.half_res)
        return [
            min(
                *(ladder.costs[0] for ladder in network),
                *(
                    self._tile(index, loosest, True, option).size
                    for option in self._layer_options()
                ),
            )
            for index, network in enumerate(ways)
        ]

    def ladders(self, caps: Sequence[int] | None = None) -> list[list[Ladder]]:
        """Per tile, the ways to spend bytes: the network's iterations alone (at full, and
        with ``half_res`` at half resolution), then with each of ``coarse_options`` (over the
        base iterations from 1, at full and with ``half_res`` at half resolution), and last
        residual layers at :meth:`_layer_errors` (each on its cheapest full-resolution
        base), one ladder per ``layer_coarse_options``.

        With ``caps``, tile ``i``'s layered ladders stop after the first layer costing more
        than ``caps[i]`` bytes (a tighter bound costs more still), and the layers after it
        are not coded: coding layers is most of a bpp target's time (see
        :func:`_allocate_lazily`)."""
        ways = []
        for index, network in enumerate(self.candidates.ladders(half_res=self.half_res)):
            corrected = [
                _ladder([self._corrected(index, k, *way) for k in self._coarse_iterations()])
                for way in self._coarse_ways()
            ]
            cap = None if caps is None else caps[index]
            layered = [
                _ladder(self._affordable_layers(index, option, cap))
                for option in self._layer_options()
            ]
            ways.append([*network, *corrected, *layered])
        return ways

    def _affordable_layers(
        self, index: int, option: tuple[int, int] | None, cap: int | None
    ) -> list[_LayeredTile]:
        """The tile's layers over ``option`` at :meth:`_layer_errors`, up to the first that
        costs more than ``cap`` bytes (None: all; that one is coded to be found, and kept, so
        the allocation can say it wants the ladder to go on)."""
        layers = []
        for error in self._layer_errors(option):
            layers.append(self._tile(index, error, True, option))
            if cap is not None and layers[-1].size > cap:
                break
        return layers

    def _needs_reach(
        self, ladders: list[Ladder], way: int, step: int, reach: int, cheapest: int
    ) -> bool:
        """Whether a tile picked at ``(way, step)`` of ``ladders`` coded with ``reach`` bytes
        beyond its ``cheapest`` might have picked a layer beyond them: it took the last rung
        of a cut layered ladder, or spent over half its reach."""
        spent = sum(ladders[way].costs[:step])
        layered = way - (len(ladders) - len(self._layer_options()))
        if layered >= 0:
            errors = self._layer_errors(self._layer_options()[layered])
            if step == len(ladders[way].costs) < len(errors):
                return True
        return spent > cheapest + reach // 2

    def _layer_errors(self, option: tuple[int, int] | None) -> list[int]:
        """The max errors of the bpp ladder of layers over ``option``, loosest first."""
        return [e for e in ladder_max_errors(self.image.peak) if _corrects_under(option, e)]

    def _choices(self, picks: list[tuple[int, int]]) -> list[_Choice]:
        """The allocator's picks over :meth:`ladders` as tile codings."""
        network_ways = 2 if self.half_res else 1
        coarse_ways = self._coarse_ways()
        layered_way = network_ways + len(coarse_ways)
        choices: list[_Choice] = []
        for index, (way, step) in enumerate(picks):
            if way >= layered_way:
                option = self._layer_options()[way - layered_way]
                layer = self._tile(index, self._layer_errors(option)[step - 1], True, option)
                choices.append(_Choice(layer.iterations, layer))
            elif way >= network_ways:
                coarse_way = coarse_ways[way - network_ways]
                k = self._coarse_iterations()[step - 1]
                correction = self._corrected(index, k, *coarse_way)
                choices.append(_Choice(k, half_res=coarse_way[2], coarse=correction))
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


def _corrects_under(option: tuple[int, int] | None, max_error: int) -> bool:
    """Whether a layer with ``max_error`` is offered over the coarse correction ``option``
    (None: no correction, always): only if the layer is no finer than the correction's step,
    or it codes the shading anyway and the correction's bytes are wasted (estimated 0.1-8%
    larger on every tile of two radiographs at D = 0-2)."""
    return option is None or max_error >= option[1]


def _ladder(rungs: Sequence[_LayeredTile | _CoarseTile]) -> Ladder:
    """Codings of one tile in order as a ladder of byte steps and the error after each."""
    totals = [rung.size for rung in rungs]
    costs = [b - a for a, b in zip([0, *totals], totals, strict=False)]
    return Ladder(costs, [rung.squared_error for rung in rungs])


def select_layered(
    images: Sequence[ResidualCandidates], bpp: float, exhaustive: bool = False
) -> list[EncodeResult]:
    """One bpp budget (``bpp`` times all the images' pixels) over several coded images (an
    image's chunks, each its own stream): each tile coded by the network alone or with a
    residual layer, whichever the bytes buy more with (the allocation of
    :func:`codec.rate.allocate_ladders`), then bounds tightened with what is left. A result's
    ``max_error`` is its largest bound when all its tiles have a layer; ``target_met`` says
    whether the streams together fit. Layers are coded as the allocation needs them
    (:func:`_allocate_lazily`); ``exhaustive`` codes every one first (the same streams, for
    checking that, at 1.5-3 times the time)."""
    budget = int(bpp * sum(image.image.pixels.size for image in images) / 8)
    overhead = sum(image._overhead() for image in images)
    if exhaustive:
        ladders = [image.ladders() for image in images]
        picks = allocate_ladders([tile for image in ladders for tile in image], budget - overhead)
    else:
        ladders, picks = _allocate_lazily(images, budget - overhead)
    choices, start = [], 0
    for image, tiles in zip(images, ladders, strict=True):
        choices.append(image._choices(picks[start : start + len(tiles)]))
        start += len(tiles)
    choices = _tighten(images, choices, budget)
    fits = _spent(images, choices) <= budget
    return [image._result(chosen, fits) for image, chosen in zip(images, choices, strict=True)]


def _allocate_lazily(
    images: Sequence[ResidualCandidates], budget: int
) -> tuple[list[list[list[Ladder]]], list[tuple[int, int]]]:
    """Each image's ladders and the allocation's picks over all their tiles, coding no more
    layers than the allocation needs.

    A tile can spend at most its cheapest coding plus what the budget leaves beyond every
    tile's cheapest (``spare``); layers costing more are never coded. Tighter still, the
    ladders are first coded only up to twice a tile's even share of ``spare``, and a tile
    the allocation takes to the end of a layered ladder, or past half its reach, has its
    reach doubled and the allocation is rerun: on radiographs most tiles settle near their
    share, and the ladders are convex in bytes, so the picks are those of the full ladders
    (identical streams on the images measured in docs/codec.md, "Stop 14") at half the
    layers coded."""
    cheapest = [image.cheapest() for image in images]
    spare = max(budget - sum(sum(tiles) for tiles in cheapest), 0)
    count = sum(len(tiles) for tiles in cheapest)
    reach = [[min(2 * spare // count, spare)] * len(tiles) for tiles in cheapest]
    while True:
        ladders = [
            image.ladders([low + extra for low, extra in zip(tiles, more, strict=True)])
            for image, tiles, more in zip(images, cheapest, reach, strict=True)
        ]
        picks = allocate_ladders([tile for image in ladders for tile in image], budget)
        grown, start = False, 0
        for image, tiles, more, lows in zip(images, ladders, reach, cheapest, strict=True):
            for index, (way, step) in enumerate(picks[start : start + len(tiles)]):
                if more[index] < spare and image._needs_reach(
                    tiles[index], way, step, more[index], lows[index]
                ):
                    more[index] = min(max(2 * more[index], 1), spare)
                    grown = True
            start += len(tiles)
        if not grown:
            return ladders, picks


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
                tighter = image._tile(index, layer.max_error - 1, True, layer.coarse_option)
                extra = tighter.size - layer.size
                gain = layer.squared_error - tighter.squared_error
                if spent + extra <= budget and gain > 0:
                    options.append((gain / max(extra, 1), number, index, tighter))
        if not options:
            return choices
        _, number, index, tighter = max(options, key=lambda option: option[0])
        choices[number][index] = _Choice(tighter.iterations, tighter)
