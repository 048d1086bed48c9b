"""Feed-forward sub-blocks: gated (GeGLU / SwiGLU, Shazeer 2020) and plain (ReLU / GeLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.prefill import epilogue_kernels, gelu_mul
from ..ops.quant import bf16_gemm_path
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
        self.kind = kind
        self.act = ACTIVATIONS[kind]
        self.gate = Linear(width, hidden, bias=bias) if kind in GATED else None
        self.up = Linear(width, hidden, bias=bias)
        self.down = Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Without autograd on CPU a GeGLU takes the fused epilogue `gelu_mul` (ops/prefill.py: one pass instead of
        torch's tanh GeLU and a product). Where all three matrices run the bf16 GEMM (prefill of bf16/int8/int4
        weights), x is cast to bf16 once and the bf16 products go from one GEMM to the next, the biases added in
        float32 inside the epilogues; `forward_ref` is the twin."""
        if self.kind != "geglu" or epilogue_kernels(x) is None:
            return self.forward_ref(x)
        if bf16_gemm_path(x, self.gate, self.up, self.down):
            xb = x.to(torch.bfloat16)
            h = gelu_mul(self.gate.weight.linear(xb), self.up.weight.linear(xb), self.gate.bias, self.up.bias,
                         torch.bfloat16)
            return self.down.weight.linear(h, self.down.bias, out_dtype=x.dtype)
        return self.down(gelu_mul(self.gate(x), self.up(x), out_dtype=x.dtype))

    def forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP in plain torch ops (training, other devices; the reference of the fused paths)."""
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(h)
