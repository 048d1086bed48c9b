"""RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x²) + eps) · g."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.decode import row_kernels


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension of `x [..., D]`.

    `unit_offset=False`: gain `g` initialised to 1, statistics computed in float32 (Llama convention).
    `unit_offset=True`: gain is `1 + scale` with `scale` initialised to 0, computed in the input dtype
    (Gemma / RecurrentGemma convention, `recurrentgemma/torch/layers.py` RMSNorm).
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """For fp32 CPU inputs without autograd, the fused C++ kernel `rms_norm` (ops/decode.py, 7 ops → 1; in fp32
        both conventions agree); otherwise its pure-torch twin `forward_ref`."""
        kernels = row_kernels(x)
        if kernels is not None:
            return kernels.rms_norm(x, self.weight, self.eps, 1.0 if self.unit_offset else 0.0)
        return self.forward_ref(x)

    def forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        """The norm in pure torch (the reference of the kernel)."""
        if self.unit_offset:
            var = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(var + self.eps) * (1 + self.weight)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)
