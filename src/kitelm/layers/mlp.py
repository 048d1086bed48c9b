"""Feed-forward sub-blocks: gated (GeGLU / SwiGLU, Shazeer 2020) and plain (ReLU / GeLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

ACTIVATIONS = {
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
    "swiglu": F.silu,
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}
GATED = ("geglu", "swiglu")


class MLP(nn.Module):
    """x [..., D] → [..., D].  Gated: down(act(gate(x)) ⊙ up(x)).  Plain: down(act(up(x)))."""

    def __init__(self, width: int, hidden: int, kind: str = "geglu", bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.gate = Linear(width, hidden, bias=bias) if kind in GATED else None
        self.up = Linear(width, hidden, bias=bias)
        self.down = Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(h)
