"""Building blocks of the RNN-Conv codec: a convolutional GRU cell and the binarizer.

GRU rather than LSTM: three gates instead of four and one state tensor instead of two, which
is a quarter less compute per recurrent layer on CPUs that must decode without a GPU.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvGRUCell(nn.Module):
    """A convolutional GRU whose input convolution may be strided (to downsample).

    The hidden state lives at the output resolution: ``input_size // stride``.
    """

    def __init__(self, in_channels: int, hidden_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.input_gates = nn.Conv2d(
            in_channels, 3 * hidden_channels, kernel_size=3, stride=stride, padding=1
        )
        self.hidden_gates = nn.Conv2d(
            hidden_channels, 3 * hidden_channels, kernel_size=3, padding=1, bias=False
        )

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        from_input = self.input_gates(x)
        if hidden is None:
            hidden = from_input.new_zeros(
                from_input.shape[0], self.hidden_channels, *from_input.shape[2:]
            )
        from_hidden = self.hidden_gates(hidden)
        xz, xr, xn = from_input.chunk(3, dim=1)
        hz, hr, hn = from_hidden.chunk(3, dim=1)
        update = torch.sigmoid(xz + hz)
        reset = torch.sigmoid(xr + hr)
        candidate = torch.tanh(xn + reset * hn)
        return (1 - update) * candidate + update * hidden


class Binarizer(nn.Module):
    """1x1 conv to ``bits`` channels, tanh, then sign.

    In training the sign is stochastic (``P(+1) = (1 + t) / 2``) with a straight-through
    gradient, as in Toderici et al.: the noise keeps the decoder honest about quantisation.
    """

    def __init__(self, in_channels: int, bits: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, bits, kernel_size=1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.quantise(self.soft(features))

    def soft(self, features: torch.Tensor) -> torch.Tensor:
        """The code before its sign: in (-1, 1), near 0 where the encoder is unsure."""
        return torch.tanh(self.project(features))

    def quantise(self, soft: torch.Tensor) -> torch.Tensor:
        if self.training:
            noise = torch.rand_like(soft)
            hard = torch.where(noise < (1 + soft) / 2, 1.0, -1.0)
        else:
            hard = torch.where(soft >= 0, 1.0, -1.0)
        return soft + (hard - soft).detach()
