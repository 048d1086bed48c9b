"""Triton kernels of the linear scan h_t = a_t ⊙ h_{t-1} + x_t (the GPU backend "triton" of `ops.scan`).

One program per (batch row, block of BLOCK_D channels) walks the T steps sequentially, keeping h in registers: the
scan is memory-bound (12 B per element forward, 20 B backward), so reading each element once is the whole game.
Forward stores h; backward runs the reverse scan g_t = dh_t + a_{t+1} g_{t+1} (entering with dh_last) and writes
dx_t = g_t, da_t = g_t h_{t-1}, dh0 = a_0 g_0.

Import this module only when Triton is installed. Without a GPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1 set before this module is imported), which is how tests/test_scan.py checks them on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor

BLOCK_D = 128


@triton.jit
def _forward_kernel(a_ptr, x_ptr, h0_ptr, h_ptr, T, D, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    keep = cols < D
    h = tl.load(h0_ptr + row * D + cols, mask=keep & HAS_H0, other=0.0).to(h_ptr.dtype.element_ty)
    base = row.to(tl.int64) * T * D + cols  # int64: B·T·D may exceed 2^31
    for t in range(T):
        a = tl.load(a_ptr + base + t * D, mask=keep, other=0.0)
        x = tl.load(x_ptr + base + t * D, mask=keep, other=0.0)
        h = a * h + x
        tl.store(h_ptr + base + t * D, h, mask=keep)


@triton.jit
def _backward_kernel(a_ptr, h_ptr, h0_ptr, dh_ptr, dh_last_ptr, da_ptr, dx_ptr, dh0_ptr, T, D,
                     HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    keep = cols < D
    h0 = tl.load(h0_ptr + row * D + cols, mask=keep & HAS_H0, other=0.0).to(dh_ptr.dtype.element_ty)
    carry = tl.load(dh_last_ptr + row * D + cols, mask=keep, other=0.0)  # a_{t+1} g_{t+1}, entering as dh_last
    base = row.to(tl.int64) * T * D + cols  # int64: B·T·D may exceed 2^31
    for i in range(T - 1):  # t = T-1 .. 1, where h_{t-1} is in h
        t = T - 1 - i
        g = tl.load(dh_ptr + base + t * D, mask=keep, other=0.0) + carry
        tl.store(dx_ptr + base + t * D, g, mask=keep)
        tl.store(da_ptr + base + t * D, g * tl.load(h_ptr + base + (t - 1) * D, mask=keep, other=0.0), mask=keep)
        carry = tl.load(a_ptr + base + t * D, mask=keep, other=0.0) * g
    g = tl.load(dh_ptr + base, mask=keep, other=0.0) + carry  # t = 0, where h_{-1} = h0
    tl.store(dx_ptr + base, g, mask=keep)
    tl.store(da_ptr + base, g * h0, mask=keep)
    tl.store(dh0_ptr + row * D + cols, tl.load(a_ptr + base, mask=keep, other=0.0) * g, mask=keep & HAS_H0)


def _grid(x: Tensor) -> tuple[int, int]:
    return x.shape[0], triton.cdiv(x.shape[2], BLOCK_D)


class TritonScan(torch.autograd.Function):
    """Autograd wrapper: a, x [B, T, D] and h0 [B, D] or None, contiguous, one dtype.
    Returns (h [B, T, D], h_last [B, D])."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, D = x.shape
        h = torch.empty_like(x)
        _forward_kernel[_grid(x)](a, x, x if h0 is None else h0, h, T, D, HAS_H0=h0 is not None, BLOCK=BLOCK_D)
        ctx.save_for_backward(a, h, h0)
        return h, h[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor, dh_last: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        a, h, h0 = ctx.saved_tensors
        B, T, D = h.shape
        dh, dh_last = dh.contiguous(), dh_last.contiguous()
        da, dx = torch.empty_like(a), torch.empty_like(h)
        dh0 = torch.empty_like(h0) if h0 is not None else None
        _backward_kernel[_grid(h)](a, h, h if h0 is None else h0, dh, dh_last, da, dx, dx if dh0 is None else dh0,
                                   T, D, HAS_H0=h0 is not None, BLOCK=BLOCK_D)
        return da, dx, dh0
