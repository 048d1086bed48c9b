"""Depthwise causal Conv1D of Griffin's recurrent block, with the document mask and a bounded state.

    out_t = b + Σ_{s=0}^{K−1} w[K−1−s] ⊙ x_{t−s} · keep(t, s),   keep(t, s) = no document start in (t−s, t]

`w [K, L]`: w[K−1] multiplies the current token, w[0] the token K−1 steps back (GDM torch/layers.py:491-520).
The document mask is GDM's `_compute_document_mask` (torch/layers.py:575-607): tokens of an earlier document never
reach a later one. Inputs before the first token are zeros.

The state is the last K−1 inputs [B, K−1, L] (GDM torch/layers.py:525-528), with every input that a later document
start cuts off zeroed. GDM gets the same zeros by accident: its mask is applied in place to a view of `x`
(torch/layers.py:508) before the cache is sliced from `x` (:526). Since the state carries the mask, a chunk of any
length continues it exactly as the full forward would, after left padding too (GDM's decode path, which refuses
chunks, applies no mask: torch/layers.py:531-550).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode import decode_kernels
from ..ops.prefill import prefill_kernels


class Conv1D(nn.Module):
    """x [B, T, L], segment_pos [B, T], state [B, K−1, L] or None → (y [B, T, L], new state [B, K−1, L])."""

    def __init__(self, width: int, temporal_width: int = 4):
        super().__init__()
        if temporal_width < 2:
            raise ValueError(f"temporal_width={temporal_width} must be >= 2: the state keeps the last K−1 inputs")
        self.temporal_width = temporal_width
        self.w = nn.Parameter(torch.empty(temporal_width, width))
        self.b = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w, std=math.sqrt(0.01 / self.temporal_width))  # GDM: variance 0.01 over fan-in K
        nn.init.zeros_(self.b)

    def forward(self, x: torch.Tensor, segment_pos: torch.Tensor,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Any number of tokens T, continuing `state` if given (zeros before the first token otherwise)."""
        B, T, L = x.shape
        K = self.temporal_width
        prev = x.new_zeros(B, K - 1, L) if state is None else state.to(x.dtype)
        kernels = prefill_kernels(x)
        if kernels is not None:  # one pass, bit for bit the torch ops below (ops/prefill.py)
            return tuple(kernels.conv1d_forward(x, self.w, self.b, prev, segment_pos))
        ext = torch.cat([prev, x], dim=1)  # [B, K−1+T, L]: ext[K−1+t] = x_t
        # starts[:, K−1+t] = number of document starts among x_0..x_t (0 on the state slots)
        starts = F.pad(torch.cumsum(segment_pos == 0, dim=1), (K - 1, 0))
        out = None
        for s in range(K):
            tap = ext[:, K - 1 - s:K - 1 - s + T] * self.w[K - 1 - s]
            if s > 0:  # tap s at t is cut iff a document starts in (t−s, t]
                tap = tap * (starts[:, K - 1:] == starts[:, K - 1 - s:K - 1 - s + T])[..., None]
            out = tap if out is None else out + tap
        new_state = ext[:, -(K - 1):] * (starts[:, -(K - 1):] == starts[:, -1:])[..., None]
        return out + self.b, new_state

    def step(self, x: torch.Tensor, segment_pos: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step, x [B, 1, L], segment_pos [B, 1], state [B, K−1, L] → (y [B, 1, L], new state). For
        decoding-sized fp32 CPU inputs without autograd, the fused C++ kernel `conv1d_step` (ops/decode.py), which
        updates `state` in place; otherwise its pure-torch twin `step_ref`."""
        kernels = decode_kernels(x) if state.dtype == x.dtype and state.is_contiguous() else None
        if kernels is not None:
            return kernels.conv1d_step(x, self.w, self.b, state, segment_pos == 0), state
        return self.step_ref(x, segment_pos, state.to(x.dtype))

    def step_ref(self, x: torch.Tensor, segment_pos: torch.Tensor,
                 state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` in pure torch (the reference of the kernel): the forward's sum for one token without the
        document-mask bookkeeping. A document start at this token (segment_pos 0) cuts every earlier tap and clears
        them from the new state."""
        prev = state * (segment_pos != 0).to(x.dtype)[..., None]  # [B, K−1, L]
        out = x * self.w[-1] + (prev * self.w[:-1]).sum(1, keepdim=True) + self.b
        return out, torch.cat([prev[:, 1:], x], dim=1)
