"""The learned codec behind the bench's rate-distortion interface, beside the baselines.

Its rate parameter is the iteration count; ``encode_at_bpp`` uses the codec's own rate control
(per-tile iteration choice under a byte budget), which is how it is used in production. The
name ``MODEL_ID+blocks`` is the same model with spatially adaptive rate (block stops, format 2);
``+half`` lets each tile be coded at half resolution where that removes more error per byte
(:mod:`codec.resolution`, format 3); ``+refine`` refines every code at encoding
(:mod:`codec.refine`, :data:`codec.refine.DEFAULT_STEPS` steps; ``+refineN``: N steps).
Suffixes come in that order.
``MODEL_ID+residual`` lets each tile add a residual layer (:mod:`codec.near_lossless`, format
4) where that removes more error per byte than the network's iterations (``+half+residual``:
or be coded at half resolution by the network alone): it reaches the 2-4 bpp and lossless rates
the network alone cannot; ``+half+refine+residual`` refines the network's codes under it. Its
parameter is the largest pixel error of a stream whose every tile has a layer (-1 when some
tile has none).
"""

from __future__ import annotations

import re
import time
from typing import ClassVar

import numpy as np

from codec.baselines import RateDistortionCodec, RateUnreachable
from codec.bitstream import BitstreamError
from codec.io import GrayImage
from codec.learned import (
    DEFAULT_TILE_SIZE,
    AdaptiveCandidates,
    TileCandidates,
    decode_image,
    encode_candidates,
    encode_image,
)
from codec.metrics import bits_per_pixel
from codec.near_lossless import ResidualCandidates
from codec.rate import RateControl
from codec.refine import DEFAULT_STEPS, MAX_STEPS
from codec.weights import installed_models, load_model

ADAPTIVE_SUFFIX = "+blocks"
HALF_RES_SUFFIX = "+half"
REFINE_SUFFIX = "+refine"
RESIDUAL_SUFFIX = "+residual"
#: ``+refine`` or ``+refineN`` at the end of a name (before ``+residual`` in layered names).
_REFINE_PATTERN = re.compile(r"\+refine(\d*)$")


def refine_suffix(steps: int) -> str:
    """The name suffix of ``steps`` refinement steps: none, ``+refine`` for the default
    count, ``+refineN`` for any other, so bench rows of different counts stay apart."""
    if steps == 0:
        return ""
    return REFINE_SUFFIX if steps == DEFAULT_STEPS else f"{REFINE_SUFFIX}{steps}"


def _split_refine(name: str) -> tuple[str, int]:
    """``NAME+refine[N]`` -> ``(NAME, steps)``; a name without the suffix -> ``(name, 0)``."""
    match = _REFINE_PATTERN.search(name)
    if match is None:
        return name, 0
    steps = int(match.group(1)) if match.group(1) else DEFAULT_STEPS
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{name}: refinement steps must be 1 to {MAX_STEPS}, got {steps}")
    return name[: match.start()], steps


def is_learned_codec_name(name: str) -> bool:
    """Whether ``name`` is a :func:`learned_codec_names` name, or one with ``+refineN``
    (N from 1 to :data:`codec.refine.MAX_STEPS`) in place of ``+refine``."""
    layered = name.endswith(RESIDUAL_SUFFIX)
    base = name.removesuffix(RESIDUAL_SUFFIX)
    try:
        base, steps = _split_refine(base)
    except ValueError:
        return False
    canonical = base + (REFINE_SUFFIX if steps else "") + (RESIDUAL_SUFFIX if layered else "")
    return canonical in learned_codec_names()


def learned_codec_names() -> list[str]:
    """Every bench name of the installed models: each model id, uniform or adaptive, each
    with and without half-resolution tiles and code refinement."""
    network_only = [
        model + adaptive + half + refine
        for model in installed_models()
        for adaptive in ("", ADAPTIVE_SUFFIX)
        for half in ("", HALF_RES_SUFFIX)
        for refine in ("", REFINE_SUFFIX)
    ]
    layered = [
        model + half + refine + RESIDUAL_SUFFIX
        for model in installed_models()
        for half in ("", HALF_RES_SUFFIX)
        for refine in ("", REFINE_SUFFIX)
    ]
    return network_only + layered


def learned_codec(name: str) -> RateDistortionCodec:
    """The bench codec a :func:`learned_codec_names` name (or one with ``+refineN``)
    stands for."""
    if name.endswith(RESIDUAL_SUFFIX):
        model, steps = _split_refine(name.removesuffix(RESIDUAL_SUFFIX))
        half_res = model.endswith(HALF_RES_SUFFIX)
        return LayeredCodec(
            model.removesuffix(HALF_RES_SUFFIX), half_res=half_res, refine_steps=steps
        )
    return LearnedCodec.named(name)


def _decode_checked(data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
    decoded = decode_image(data)
    if decoded.pixels.shape != tuple(shape) or decoded.bits_stored != bits_stored:
        raise BitstreamError("stream geometry differs from the image's")
    return decoded.pixels


class LearnedCodec(RateDistortionCodec):
    """An installed RNN-Conv model, named by its model id."""

    parameter_range: ClassVar[tuple[float, float]] = (1, 16)
    integer_parameter: ClassVar[bool] = True

    def __init__(
        self,
        model_id: str,
        tile_size: int = DEFAULT_TILE_SIZE,
        adaptive: bool = False,
        refine_steps: int = 0,
        half_res: bool = False,
    ) -> None:
        self.model_id = model_id
        self.tile_size = tile_size
        self.adaptive = adaptive
        self.refine_steps = refine_steps
        self.half_res = half_res
        # Instances carry their model id (and modes) as name.
        suffixes = (
            (ADAPTIVE_SUFFIX if adaptive else "")
            + (HALF_RES_SUFFIX if half_res else "")
            + refine_suffix(refine_steps)
        )
        self.name = model_id + suffixes  # type: ignore[misc]
        # The bench asks for several rates of one image in a row: run the network once (per
        # threshold, in the adaptive mode).
        self._last: tuple[GrayImage, TileCandidates, float] | None = None  # and its seconds
        self._last_adaptive: AdaptiveCandidates | None = None

    @classmethod
    def named(cls, name: str) -> LearnedCodec:
        """``MODEL_ID``, optionally followed by ``+blocks``, ``+half`` and ``+refine[N]``."""
        name, steps = _split_refine(name)
        half_res = name.endswith(HALF_RES_SUFFIX)
        name = name.removesuffix(HALF_RES_SUFFIX)
        adaptive = name.endswith(ADAPTIVE_SUFFIX)
        return cls(
            name.removesuffix(ADAPTIVE_SUFFIX),
            adaptive=adaptive,
            refine_steps=steps,
            half_res=half_res,
        )

    def _candidates(self, image: GrayImage) -> TileCandidates:
        if self._last is None or self._last[0] is not image:
            started = time.perf_counter()
            candidates = encode_candidates(
                image,
                None,
                self.model_id,
                self.tile_size,
                refine_steps=self.refine_steps,
                half_res=self.half_res,
            )
            self._last = (image, candidates, time.perf_counter() - started)
        return self._last[1]

    def _adaptive(self, image: GrayImage) -> AdaptiveCandidates:
        if self._last_adaptive is None or self._last_adaptive.image is not image:
            self._last_adaptive = AdaptiveCandidates(
                image, self.model_id, self.tile_size, self.refine_steps, self.half_res
            )
        return self._last_adaptive

    def _rate(self, bpp: float) -> RateControl:
        return RateControl(bpp=bpp, half_res=self.half_res)

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        rate = RateControl(iterations=int(parameter))
        return encode_image(image, rate, self.model_id, self.tile_size, self.refine_steps).data

    def encode_seconds(self, image: GrayImage, target_bpp: float, parameter: float) -> float:
        """What ``radiarc encode --bpp`` spends on this image: the rate control is the
        encode (every tile coded, then a stream chosen), so the network and entropy-coding
        time of the candidates :meth:`encode_at_bpp` needed, plus a timed selection; not a
        uniform re-encode at the mean iteration count, which would understate it."""
        del parameter
        started = time.perf_counter()
        if self.adaptive:
            adaptive = self._adaptive(image)
            adaptive.select(target_bpp)
            network = adaptive.network_seconds(target_bpp)
        else:
            self._candidates(image).select(self._rate(target_bpp))
            assert self._last is not None
            network = self._last[2]
        return network + time.perf_counter() - started

    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
        return _decode_checked(data, shape, bits_stored)

    def encode_at_bpp(
        self, image: GrayImage, target_bpp: float, *, tolerance: float = 0.01
    ) -> tuple[bytes, float]:
        del tolerance  # the byte allocation is exact
        if self.adaptive:
            result = self._adaptive(image).select(target_bpp)
        else:
            result = self._candidates(image).select(self._rate(target_bpp))
        if not result.target_met:
            achieved = bits_per_pixel(result.n_bytes, image.pixels.size)
            raise RateUnreachable(self.name, target_bpp, achieved, 1)
        mean_iterations = sum(result.tile_iterations) / len(result.tile_iterations)
        return result.data, round(mean_iterations, 2)


class LayeredCodec(RateDistortionCodec):
    """An installed model with a residual layer; the parameter is the largest pixel error."""

    parameter_range: ClassVar[tuple[float, float]] = (0, 65535)
    integer_parameter: ClassVar[bool] = True
    rate_rises_with_parameter: ClassVar[bool] = False

    def __init__(
        self,
        model_id: str,
        tile_size: int = DEFAULT_TILE_SIZE,
        half_res: bool = False,
        refine_steps: int = 0,
    ) -> None:
        self.model_id = model_id
        self.tile_size = tile_size
        self.half_res = half_res
        self.refine_steps = refine_steps
        half = HALF_RES_SUFFIX if half_res else ""
        self.name = model_id + half + refine_suffix(refine_steps) + RESIDUAL_SUFFIX  # type: ignore[misc]
        self._last: tuple[GrayImage, ResidualCandidates, float] | None = None  # and seconds

    def parameter_bounds(self, image: GrayImage) -> tuple[float, float]:
        return (0, image.peak)

    def _candidates(self, image: GrayImage) -> ResidualCandidates:
        # The bench asks for several rates of one image in a row: run the network once.
        if self._last is None or self._last[0] is not image:
            started = time.perf_counter()
            candidates = ResidualCandidates.for_bpp(
                image, self.model_id, self.tile_size, self.half_res, self.refine_steps
            )
            self._last = (image, candidates, time.perf_counter() - started)
        return self._last[1]

    def encode(self, image: GrayImage, parameter: float) -> bytes:
        return self._candidates(image).stream(int(parameter)).data

    def encode_lossless(self, image: GrayImage) -> bytes:
        return self.encode(image, 0)

    def encode_seconds(self, image: GrayImage, target_bpp: float, parameter: float) -> float:
        """What ``radiarc encode --bpp X --residual`` spends: the network once, the layers
        coded for this rate and the image's rates before it (shared: each layer is coded
        once; the search codes more of them the higher the rate, so this is about the
        highest rate's own), and a timed allocation."""
        del parameter
        candidates = self._candidates(image)
        assert self._last is not None
        started = time.perf_counter()
        candidates.at_bpp(target_bpp)
        return self._last[2] + candidates.layer_seconds + time.perf_counter() - started

    def decode(self, data: bytes, shape: tuple[int, int], bits_stored: int) -> np.ndarray:
        return _decode_checked(data, shape, bits_stored)

    def encode_at_bpp(
        self, image: GrayImage, target_bpp: float, *, tolerance: float = 0.01
    ) -> tuple[bytes, float]:
        del tolerance  # the search over max errors is exact
        result = self._candidates(image).at_bpp(target_bpp)
        if not result.target_met:
            achieved = bits_per_pixel(result.n_bytes, image.pixels.size)
            raise RateUnreachable(self.name, target_bpp, achieved, image.peak)
        return result.data, float(-1 if result.max_error is None else result.max_error)


def learned_codecs() -> dict[str, LearnedCodec]:
    """One bench codec per installed model whose weights load."""
    codecs = {}
    for model_id in installed_models():
        load_model(model_id)
        codecs[model_id] = LearnedCodec(model_id)
    return codecs
