"""The Real-Gated Linear Recurrent Unit (RG-LRU) of Griffin (De et al. 2024, §2.4), exactly as the official code.

For the input x_t [L] (the Conv1D output) and the reset ρ_t = [segment_pos_t == 0]:

    i_t     = σ(BlockDiag_input(x_t))                     input gate
    r_t     = σ(BlockDiag_a(x_t))                         recurrence gate
    log a_t = −c · r_t · softplus(a_param),  c = 8         (a = σ(Λ) with a_param = −Λ, so log a = −softplus(a_param))
    mult_t  = 1 if ρ_t else sqrt(1 − a_t²)                  a² from its own exp, sqrt with a bounded gradient
    h_t     = (1 − ρ_t) · a_t ⊙ h_{t−1} + mult_t ⊙ i_t ⊙ x_t   accumulated in float32

GDM reference: `recurrentgemma/torch/layers.py:76-137` (BlockDiagonalLinear), `:141-191` (rnn_scan),
`:194-213` (init), `:216-230` (SqrtBoundDerivative), `:233-376` (RGLRU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode import decode_isa, decode_kernels
from ..ops.prefill import prefill_isa, prefill_kernels
from ..ops.scan import linear_scan

C = 8.0  # Griffin eq. (4): the exponent scale of a_t = a^(c·r_t); GDM torch/layers.py:342
MAX_SQRT_GRADIENT = 1000.0  # GDM torch/layers.py _MAX_SQRT_GRADIENT: d sqrt(x)/dx is capped at 1000 (bf16 NaNs)
MIN_RAD, MAX_RAD = 0.9, 0.999  # a = σ(Λ) drawn with a² uniform on [0.81, 0.998]; GDM torch/layers.py:297


class SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) forward; backward grad / sqrt(max(4x, 1/1000²)), i.e. the derivative clipped at 1000
    (GDM torch/layers.py:216-230)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output / torch.sqrt(torch.clip(4.0 * x, min=1 / MAX_SQRT_GRADIENT**2))


class BlockDiagonalLinear(nn.Module):
    """x [..., H·bw] → [..., H·bw] with H independent blocks: y[..., h, j] = Σ_i x[..., h, i] · w[h, i, j] + b[h, j].

    `w [H, bw, bw]` is stored `[in, out]` per block (x @ w), as GDM (torch/layers.py:76-137)."""

    def __init__(self, width: int, num_blocks: int):
        super().__init__()
        self.num_blocks, self.block_width = num_blocks, width // num_blocks
        self.w = nn.Parameter(torch.empty(num_blocks, self.block_width, self.block_width))
        self.b = nn.Parameter(torch.empty(num_blocks, self.block_width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w, std=math.sqrt(1.0 / self.block_width))  # variance 1/fan-in of a block
        nn.init.zeros_(self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One batched matmul over the blocks: [H, N, bw] @ [H, bw, bw] + b (1.5× faster than einsum on CPU)."""
        return self.blocks(x).transpose(0, 1).reshape(x.shape)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H·bw] → the output as the batched matmul leaves it, [H, N, bw] (N = the rows of x)."""
        xb = x.reshape(-1, self.num_blocks, self.block_width).transpose(0, 1)  # [H, N, bw]
        return torch.baddbmm(self.b.unsqueeze(1), xb, self.w)


def rnn_param_init_(a_param: torch.Tensor) -> torch.Tensor:
    """Ring init (GDM torch/layers.py:194-213): u ~ U[min²+ε, max²+ε], log r = ½ log u, a_param = log(exp(−log r) − 1),
    the inverse softplus, so softplus(a_param) = −log r."""
    with torch.no_grad():
        a_param.uniform_(MIN_RAD**2 + 1e-8, MAX_RAD**2 + 1e-8)
        return a_param.log_().mul_(0.5).neg_().exp_().sub_(1.0).log_()


class RGLRU(nn.Module):
    """x [B, T, L], segment_pos [B, T] (0 = document start), h0 [B, L] float32 or None →
    (y [B, T, L] in x.dtype, h_last [B, L] float32). `num_heads` is the number of gate blocks."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.a_param = nn.Parameter(torch.empty(width))
        self.input_gate = BlockDiagonalLinear(width, num_heads)
        self.a_gate = BlockDiagonalLinear(width, num_heads)
        rnn_param_init_(self.a_param)

    def forward(self, x: torch.Tensor, segment_pos: torch.Tensor,
                h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Any number of tokens: the gates in parallel, then the scan h_t = a_t ⊙ h_{t−1} + x̂_t of
        `kitelm.ops.scan.linear_scan` (accumulated in float32)."""
        kernels = prefill_kernels(x)
        if kernels is not None:  # gates and scan in one pass (ops/prefill.py); this path below is its twin
            h0 = x.new_zeros(x.shape[0], x.shape[2]) if h0 is None else h0
            return tuple(kernels.rglru_scan(x, self.input_gate.blocks(x), self.a_gate.blocks(x),
                                            F.softplus(self.a_param), h0, segment_pos == 0, C, prefill_isa()))
        a, normalized_x = self._gated(x, segment_pos)
        return linear_scan(a, normalized_x, h0)

    def step(self, x: torch.Tensor, segment_pos: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step, x [B, 1, L], segment_pos [B, 1], h [B, L] float32 → (y [B, 1, L], new h [B, L]). For
        decoding-sized fp32 CPU inputs without autograd, the fused C++ kernel `rglru_step` (ops/decode.py, ~20 ops
        → 1); otherwise its pure-torch twin `step_ref`."""
        kernels = decode_kernels(x)
        if kernels is not None:
            h = kernels.rglru_step(x, self.input_gate.w, self.input_gate.b, self.a_gate.w, self.a_gate.b,
                                   F.softplus(self.a_param), h, segment_pos == 0, C, decode_isa())
            return h.unsqueeze(1), h
        return self.step_ref(x, segment_pos, h)

    def step_ref(self, x: torch.Tensor, segment_pos: torch.Tensor,
                 h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` in pure torch (the reference of the kernel): h = a ⊙ h + x̂ for the one token, in float32 (float64
        for float64 inputs), with the forward's gates."""
        a, normalized_x = self._gated(x, segment_pos)
        acc = torch.float64 if torch.float64 in (a.dtype, normalized_x.dtype) else torch.float32
        h = torch.addcmul(normalized_x[:, 0].to(acc), a[:, 0].to(acc), h.to(acc))
        return h.unsqueeze(1).to(x.dtype), h

    def _gated(self, x: torch.Tensor, segment_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a with the resets folded in as a_t = 0, x̂ = mult ⊙ i ⊙ x), both [B, T, L]: the module docstring's
        equations before the recurrence."""
        reset = (segment_pos == 0)[..., None]
        gate_x = torch.sigmoid(self.input_gate(x))
        gate_a = torch.sigmoid(self.a_gate(x))
        log_a = -C * gate_a * F.softplus(self.a_param)
        a = torch.exp(log_a)
        a_square = torch.exp(2 * log_a)  # a separate exp, not a*a (GDM torch/layers.py:344)
        multiplier = SqrtBoundDerivative.apply(1 - a_square)
        multiplier = torch.where(reset, 1.0, multiplier)  # 1 at a document start (GDM torch/layers.py:352)
        normalized_x = x * gate_x * multiplier.type(x.dtype)
        return a.masked_fill(reset, 0.0), normalized_x  # the reset drops h_{t−1} (GDM :160)
