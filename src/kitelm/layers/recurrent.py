"""Griffin's recurrent block (De et al. 2024, §2.4, Fig. 2; GDM torch/modules.py:496-680) and its inference state.

    y = gelu_tanh(W_y x + b_y);  u = RG-LRU(Conv1D(W_x x + b_x));  out = W_out(u ⊙ y) + b_out

The state is the Conv1D's last K−1 inputs and the RG-LRU's h: its size does not depend on the number of tokens seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.prefill import epilogue_kernels, gelu_mul
from ..ops.quant import bf16_gemm_path
from .conv1d import Conv1D
from .linear import Linear
from .rglru import RGLRU
from .state import LayerState


class RecurrentState(LayerState):
    """One recurrent block's state: `conv [B, K−1, L]` (model dtype) and `h [B, L]` (float32, GDM
    torch/layers.py:367-376). Buffers are batch-first (`layers/state.py`)."""

    def __init__(self, batch: int, lru_width: int, conv_width: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("conv", torch.zeros(batch, conv_width - 1, lru_width, dtype=dtype, device=device))
        self.register_buffer("h", torch.zeros(batch, lru_width, dtype=torch.float32, device=device))


class RecurrentBlock(nn.Module):
    """x [B, T, D], segment_pos [B, T], state → [B, T, D] (updates `state` in place)."""

    def __init__(self, width: int, lru_width: int, num_heads: int, conv_width: int, final_var_scale: float):
        super().__init__()
        self.linear_y = Linear(width, lru_width)
        self.linear_x = Linear(width, lru_width)
        self.linear_out = Linear(lru_width, width)
        self.conv_1d = Conv1D(lru_width, conv_width)
        self.rg_lru = RGLRU(lru_width, num_heads)
        for lin, scale in ((self.linear_y, 1.0), (self.linear_x, 1.0), (self.linear_out, final_var_scale)):
            nn.init.normal_(lin.weight, std=math.sqrt(scale / lin.in_features))
            nn.init.zeros_(lin.bias)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> RecurrentState:
        """A zero state for `batch` rows (`max_len` is ignored: the state is bounded)."""
        return RecurrentState(batch, self.linear_x.out_features, self.conv_1d.temporal_width, dtype, device)

    def forward(self, x: torch.Tensor, segment_pos: torch.Tensor, state: RecurrentState | None) -> torch.Tensor:
        """Any number of tokens T (one token with a state takes `step`). Where the three matrices run the bf16 GEMM
        (prefill of bf16/int8/int4 weights), x is cast to bf16 once, the y branch stays a bf16 product whose bias
        and GeLU are applied by the fused epilogue `gelu_mul` together with the product by u, and that bf16 result
        is the input of `linear_out`: the same float32 maths as the plain path, fewer passes."""
        if state is not None and x.shape[1] == 1:
            return self.step(x, segment_pos, state)
        fused = bf16_gemm_path(x, self.linear_y, self.linear_x, self.linear_out)
        if fused:
            xb = x.to(torch.bfloat16)
            y = self.linear_y.weight.linear(xb)  # the bare bf16 product: bias and GeLU are applied in `_output`
            x_branch = self.linear_x.weight.linear(xb, self.linear_x.bias, out_dtype=x.dtype)
        else:
            y, x_branch = self.linear_y(x), self.linear_x(x)
        u, conv_state = self.conv_1d(x_branch, segment_pos, state.conv if state is not None else None)
        u, h = self.rg_lru(u, segment_pos, state.h if state is not None else None)
        if state is not None:
            state.conv.copy_(conv_state)
            state.h.copy_(h)
        return self._output(y, u, fused)

    def _output(self, y: torch.Tensor, u: torch.Tensor, fused: bool) -> torch.Tensor:
        """W_out(u ⊙ gelu_tanh(y)) + b_out, y = W_y x + b_y (`fused`: y is the bare bf16 product W_y x, its bias added
        in the epilogue, and the result is the bf16 input of W_out's bf16 GEMM). Without autograd on CPU the GeLU and
        the product are one pass (`gelu_mul`)."""
        if fused:
            h = gelu_mul(y, u, self.linear_y.bias, None, torch.bfloat16)
            return self.linear_out.weight.linear(h, self.linear_out.bias, out_dtype=u.dtype)
        if epilogue_kernels(u) is not None:
            return self.linear_out(gelu_mul(y, u, out_dtype=u.dtype))
        return self.linear_out(u * F.gelu(y, approximate="tanh"))  # the tanh GeLU, GDM torch/modules.py:291

    def step(self, x: torch.Tensor, segment_pos: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """One token per row, x [B, 1, D]: the Conv1D and RG-LRU decoding steps (their C++ kernels where they
        apply), `state` updated in place."""
        y = self.linear_y(x)
        u, conv_state = self.conv_1d.step(self.linear_x(x), segment_pos, state.conv)
        u, h = self.rg_lru.step(u, segment_pos, state.h)
        state.conv.copy_(conv_state)
        state.h.copy_(h)
        return self._output(y, u, fused=False)
