"""`Linear`: nn.Linear (same parameters, init and state-dict keys) whose decoding-sized calls take the fast
matrix-vector kernel of `kitelm.ops.decode`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.decode import linear


class Linear(nn.Linear):
    """x [..., in] → x Wᵀ + b [..., out]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
