"""The RNN-Conv network: recurrent encoder, binarizer, recurrent decoder, iterated on residuals.

Each iteration encodes what the previous ones left (``x - reconstruction``), scaled by a learned
per-iteration gain so that small late residuals still use the binarizer's full range (a
content-independent form of Toderici et al.'s scaled-additive reconstruction). The decoder's
output is divided by the same gain and added: any prefix of iterations is a valid, coarser image.

With ``multi_level_pooling`` the binarizer sees the encoder's features from three scales (1/4 and
1/8 average-pooled down to the 1/16 bottleneck, beside the 1/16 features), as in Sushmit et al.
2019; without it, only the last encoder layer, as in Toderici et al. 2017.

Contract (after CompressAI): ``forward`` for training returns every iteration's reconstruction;
``compress`` returns binary codes (tensors of +-1) and the reconstructions the decoder will see;
``decompress`` rebuilds from codes. Packing codes into bytes is not this module's business.

Spatially adaptive rate (after Johnston et al. 2018): ``compress`` can be given a stop rule that,
after each iteration, says which 16x16 blocks still need refining. A block that stopped gets
all-zero codes from then on (neither +1 nor -1, so nothing to transmit) and its pixels are
frozen: ``decompress`` reads the same zero codes as "stopped" and leaves those pixels alone, so
encoder and decoder agree exactly. With no stop rule every code is +-1 and nothing changes.

Hidden-state priming (after Johnston et al. 2018): with ``priming_steps`` k, the first iteration
runs the encoder k extra times on its input and the decoder k extra times on the first code
before either's output is used. Every recurrent state starts at zero, so without priming the
first (and, at low rates, most important) reconstruction comes from a single pass; priming gives
it k more recurrent passes of depth and spatial context for no extra bits. Later iterations are
unchanged, so decoding costs k extra decoder passes per tile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codec.layers import Binarizer, ConvGRUCell
from codec.refine import REFINED_ITERATIONS, refine_code

DOWNSAMPLING = 16  # pixels per code position along each axis
#: More priming passes than this only multiply decode time (a hostile config must not either).
MAX_PRIMING_STEPS = 8

#: Given the input and the reconstruction so far (both ``(N, 1, H, W)``), which blocks still
#: need refining: ``(N, 1, H/16, W/16)`` of 0.0 / 1.0.
StopRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _block_update_mask(code: torch.Tensor) -> torch.Tensor:
    """1.0 over the pixels of blocks whose code is not all zero, 0.0 over stopped blocks."""
    coded = (code != 0).any(dim=1, keepdim=True).to(code.dtype)
    return F.interpolate(coded, scale_factor=DOWNSAMPLING, mode="nearest")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in checkpoints and weight files."""

    bits: int = 32
    stem_channels: int = 32
    encoder_channels: tuple[int, int, int] = (32, 64, 128)
    decoder_channels: tuple[int, int, int, int] = (128, 64, 32, 16)
    multi_level_pooling: bool = True
    max_iterations: int = 16
    #: Extra encoder and decoder passes on the first iteration (hidden-state priming); 0 for
    #: every model before rnnconv-pool-v6, whose weight files do not name it.
    priming_steps: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.priming_steps <= MAX_PRIMING_STEPS:
            raise ValueError(
                f"priming_steps must be in 0..{MAX_PRIMING_STEPS}, got {self.priming_steps}"
            )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelConfig:
        values = dict(data)
        for key in ("encoder_channels", "decoder_channels"):
            if key in values:
                values[key] = tuple(values[key])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c1, c2, c3 = config.encoder_channels
        self.pooling = config.multi_level_pooling
        self.stem = nn.Conv2d(1, config.stem_channels, 3, stride=2, padding=1)
        self.rnn1 = ConvGRUCell(config.stem_channels, c1, stride=2)
        self.rnn2 = ConvGRUCell(c1, c2, stride=2)
        self.rnn3 = ConvGRUCell(c2, c3, stride=2)
        width = c1 + c2 + c3 if self.pooling else c3
        self.binarizer = Binarizer(width, config.bits)

    def forward(
        self, residual: torch.Tensor, state: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        soft, state = self.soft_code(residual, state)
        return self.binarizer.quantise(soft), state

    def soft_code(
        self, residual: torch.Tensor, state: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The code before the binarizer's sign, and the new state."""
        h1 = self.rnn1(self.stem(residual), state[0])
        h2 = self.rnn2(h1, state[1])
        h3 = self.rnn3(h2, state[2])
        features = (
            torch.cat([F.avg_pool2d(h1, 4), F.avg_pool2d(h2, 2), h3], dim=1) if self.pooling else h3
        )
        return self.binarizer.soft(features), [h1, h2, h3]


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d1, d2, d3, d4 = config.decoder_channels
        self.lift = nn.Conv2d(config.bits, d1, kernel_size=1)
        self.rnn1 = ConvGRUCell(d1, d1)
        self.rnn2 = ConvGRUCell(d1 // 4, d2)
        self.rnn3 = ConvGRUCell(d2 // 4, d3)
        self.rnn4 = ConvGRUCell(d3 // 4, d4)
        self.to_pixels = nn.Conv2d(d4 // 4, 1, kernel_size=3, padding=1)

    def forward(
        self, code: torch.Tensor, state: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        h1 = self.rnn1(self.lift(code), state[0])
        h2 = self.rnn2(F.pixel_shuffle(h1, 2), state[1])
        h3 = self.rnn3(F.pixel_shuffle(h2, 2), state[2])
        h4 = self.rnn4(F.pixel_shuffle(h3, 2), state[3])
        return self.to_pixels(F.pixel_shuffle(h4, 2)), [h1, h2, h3, h4]


class RNNConvCodec(nn.Module):
    """Iterative residual codec over images normalised to [-0.5, 0.5].

    Inputs are ``(N, 1, H, W)`` with H and W multiples of :data:`DOWNSAMPLING`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Residuals shrink each iteration; start the gains growing ~1.5x per step.
        initial = torch.arange(config.max_iterations, dtype=torch.float32) * math.log(1.5)
        self.log_gains = nn.Parameter(initial)

    def _check_iterations(self, iterations: int) -> None:
        if not 1 <= iterations <= self.config.max_iterations:
            raise ValueError(
                f"iterations must be in 1..{self.config.max_iterations}, got {iterations}"
            )

    def forward(
        self, x: torch.Tensor, iterations: int, stop_rule: StopRule | None = None
    ) -> list[torch.Tensor]:
        """Training pass: the reconstruction after each iteration (stochastic binarizer),
        with blocks stopping as ``compress`` would stop them under ``stop_rule``."""
        codes, reconstructions = self._encode(x, iterations, stop_rule)
        del codes
        return reconstructions

    @torch.no_grad()
    def compress(
        self,
        x: torch.Tensor,
        iterations: int,
        stop_rule: StopRule | None = None,
        refine_steps: int = 0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Codes (each ``(N, bits, H/16, W/16)`` of +-1, or 0 in blocks ``stop_rule`` has
        stopped) and the reconstruction after each. With ``refine_steps``, each of the first
        iterations' codes is then searched for one the decoder turns into a closer update
        (:func:`codec.refine.refine_code`); the decoder, and so the stream format, is the same.
        """
        return self._encode(x, iterations, stop_rule, refine_steps)

    @torch.no_grad()
    def decompress(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """The reconstruction after each of ``codes``' iterations."""
        self._check_iterations(len(codes))
        state: list[torch.Tensor | None] = [None] * 4
        reconstruction: torch.Tensor | float = 0.0
        reconstructions = []
        for iteration, code in enumerate(codes):
            output, state = self.decode_step(code, state, iteration)
            update = output * _block_update_mask(code) if iteration else output
            reconstruction = reconstruction + update / self.log_gains[iteration].exp()
            reconstructions.append(reconstruction)
        return reconstructions

    def decode_step(
        self, code: torch.Tensor, state: list[torch.Tensor | None], iteration: int
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The decoder's output for ``code`` at ``iteration``, primed on the first."""
        if iteration == 0:
            for _ in range(self.config.priming_steps):
                _, state = self.decoder(code, state)
        return self.decoder(code, state)

    def _encode(
        self,
        x: torch.Tensor,
        iterations: int,
        stop_rule: StopRule | None = None,
        refine_steps: int = 0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self._check_iterations(iterations)
        if x.shape[-1] % DOWNSAMPLING or x.shape[-2] % DOWNSAMPLING:
            raise ValueError(f"height and width must be multiples of {DOWNSAMPLING}: {x.shape}")
        encoder_state: list[torch.Tensor | None] = [None] * 3
        decoder_state: list[torch.Tensor | None] = [None] * 4
        reconstruction = torch.zeros_like(x)
        codes, reconstructions = [], []
        refining: torch.Tensor | None = None  # blocks still coded; None: all of them
        for iteration in range(iterations):
            gain = self.log_gains[iteration].exp()
            target = (x - reconstruction) * gain
            if iteration == 0:
                for _ in range(self.config.priming_steps):
                    _, encoder_state = self.encoder.soft_code(target, encoder_state)
            soft, encoder_state = self.encoder.soft_code(target, encoder_state)
            code = self.encoder.binarizer.quantise(soft)
            if refining is not None:
                code = code * refining
            if refine_steps and iteration < REFINED_ITERATIONS:
                code = refine_code(
                    functools.partial(self.decode_step, iteration=iteration),
                    decoder_state,
                    soft,
                    target,
                    refining,
                    refine_steps,
                )
            output, decoder_state = self.decode_step(code, decoder_state, iteration)
            update = output * _block_update_mask(code) if refining is not None else output
            reconstruction = reconstruction + update / gain
            if stop_rule is not None:
                still = stop_rule(x, reconstruction)
                refining = still if refining is None else refining * still
            codes.append(code)
            reconstructions.append(reconstruction)
        return codes, reconstructions


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
