"""Encoder-side code refinement: search for binary codes the fixed decoder decodes better.

The trained encoder proposes each iteration's code in one pass; it is a fast approximation of
the code the decoder would turn into the closest update (the "amortisation gap" of learned
compression). Here the code is relaxed to real values, started from the encoder's soft output
(tanh before the sign, so unsure bits are the ones that move), and a few Adam steps on the
squared error of the decoded update, through a straight-through sign, look for a better one.
Every step is scored on its exact binary code, and each tile keeps the best code seen, the
encoder's own included: refinement never makes an iteration's update worse for a tile.

Only encoding changes. The decoder, its weights and the stream format are the same, so any
Radiarc reader decodes refined streams. Measured (docs/codec.md): large at one to three
iterations (low bit rates), nothing left by the sixth, so only the first
:data:`REFINED_ITERATIONS` are refined.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: Adam's step on the relaxed code (codes live in [-1, 1]): large enough that unsure bits
#: can change sign within a few steps.
LEARNING_RATE = 0.1
#: Adam's momentum averages about ``1 / (1 - beta1)`` gradients. Over a short search a long
#: memory keeps pushing bits the latest codes no longer want flipped, so momentum is matched
#: to the budget, about a quarter of the steps: beta1 0.5 at 8 steps, 0.75 at 16, 0.875 at 32
#: (stop 17, v11, 8 val tiles: at 8 steps +0.24 to +0.47 dB after one iteration against
#: Adam's usual 0.9; at 32 steps 0.875 and 0.9 are within 0.06 dB, 0.5 is 0.26-0.30 dB worse).
MOMENTUM_HORIZON = 0.25
MOMENTUM_RANGE = (0.5, 0.9)
#: Steps per iteration where a caller asks for refinement without a count: about 5 times the
#: encoding work, most of the gain of 16 steps (docs/codec.md).
DEFAULT_STEPS = 8
#: The most steps a stored setting may ask for (codec configs, migration settings).
MAX_STEPS = 64
#: Only the first iterations are refined. On v4 the gain is +1.3 dB after one iteration and
#: +0.6 after three, but the unrefined later iterations catch up (a code refined at iteration
#: 3 leaves no gain by iteration 6, and refining all ten leaves +0.03 dB), while each refined
#: iteration costs about ``steps`` decoder passes forward and back.
REFINED_ITERATIONS = 4

DecoderStep = Callable[
    [torch.Tensor, list[torch.Tensor | None]],
    tuple[torch.Tensor, list[torch.Tensor | None]],
]


def _sign(relaxed: torch.Tensor) -> torch.Tensor:
    """+-1 forwards (0 counts as +1, as in the binarizer), identity backwards."""
    hard = torch.where(relaxed >= 0, 1.0, -1.0).to(relaxed.dtype)
    return relaxed + (hard - relaxed).detach()


def momentum(steps: int) -> float:
    """Adam's ``beta1`` for a search of ``steps`` steps (:data:`MOMENTUM_HORIZON`)."""
    low, high = MOMENTUM_RANGE
    return min(high, max(low, 1 - 1 / (MOMENTUM_HORIZON * steps)))


def refine_code(
    decoder: DecoderStep,
    state: list[torch.Tensor | None],
    soft: torch.Tensor,
    target: torch.Tensor,
    refining: torch.Tensor | None,
    steps: int,
) -> torch.Tensor:
    """The best +-1 code (0 in stopped blocks) found in ``steps`` steps, per tile.

    ``soft`` is the encoder's code before the sign, ``(N, bits, h, w)``; ``target`` the
    update the decoder should produce from ``state``, ``(N, 1, H, W)``; ``refining`` the
    blocks still coded, ``(N, 1, h, w)`` of 0/1, or None for all of them.
    """
    if steps < 1:
        raise ValueError(f"refinement needs at least one step, got {steps}")
    block_mask = torch.ones_like(soft[:, :1]) if refining is None else refining
    pixel_mask = F.interpolate(block_mask, size=target.shape[-2:], mode="nearest")
    relaxed = soft.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([relaxed], lr=LEARNING_RATE, betas=(momentum(steps), 0.999))
    best_code = torch.where(soft >= 0, 1.0, -1.0).to(soft.dtype) * block_mask
    best_error = torch.full((soft.shape[0],), torch.inf, device=soft.device)
    with torch.enable_grad():
        for step in range(steps + 1):  # the first pass scores the encoder's own code
            code = _sign(relaxed) * block_mask
            output, _ = decoder(code, state)
            error = ((output * pixel_mask - target * pixel_mask) ** 2).flatten(1).mean(dim=1)
            better = error.detach() < best_error
            best_error = torch.where(better, error.detach(), best_error)
            best_code = torch.where(better[:, None, None, None], code.detach(), best_code)
            if step == steps:
                break
            # Gradients for the code only: the network's weights are not touched.
            (relaxed.grad,) = torch.autograd.grad(error.sum(), [relaxed])
            optimiser.step()
    return best_code
