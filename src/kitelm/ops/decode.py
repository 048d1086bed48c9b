"""Kernels for decoding: a few rows per call, fp32, on CPU, without autograd (csrc/decode_kernels.cpp).

A batch-1 decoding step is bound by reading every weight once and by dispatching hundreds of tiny ops, not by
FLOPs. Six kernels take those costs on: `small_linear` (a weight-streaming matrix-vector product split across
threads, 1.5-3× faster than MKL's small-M GEMM on the AMD Zen3 but slower on the Intel Xeon, so on Intel CPUs
`linear` leaves fp32 products to F.linear: benchmarks/NOTES.md), `rms_norm` (7 ops → 1; it also serves
prefill-sized inputs, `row_kernels`), `conv1d_step` and `rglru_step` (one Conv1D / RG-LRU time step, ~20 ops → 1),
`rope_rotate` (the rotary embedding of ≤ 8 tokens, ~16 ops → 1) and `attend_ring` (one query token's softmax
attention over a ring KV cache). Each is called by its layer (`linear` below, `RMSNorm.forward`, `Conv1D.step`,
`RGLRU.step`, `RotaryEmbedding.pair`, `softmax_attend_one`) when `decode_kernels(x)` (or `row_kernels(x)`) says it
applies; the layer's pure-torch twin (`F.linear`, `RMSNorm.forward_ref`, `Conv1D.step_ref`, `RGLRU.step_ref`,
`RotaryEmbedding.rotate`, the ring's torch products) runs everywhere else (training, other dtypes and devices,
machines where it does not build) and is the reference the kernels are tested against (tests/test_decode.py,
tests/test_griffin.py). `rglru_step` and `attend_ring` run AVX-512 or AVX2 loops, whichever is the best the CPU has
(`decode_isa`; `KITELM_DECODE_ISA=plain|avx2|avx512` forces one, as the tests do to check each path); the others are
compiled for the build machine's CPU (-march=native).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .extension import CppExtension, KernelPaths

MAX_ROWS = 8  # above this, MKL's GEMM reuses each weight across rows better than the row-streaming loop
EXTENSION = CppExtension("decode_kernels", fallback="decoding uses the pure-torch layers")
ISAS = {"plain": 0, "avx2": 1, "avx512": 2}  # the vector paths of rglru_step and attend_ring


def decode_kernels(x: Tensor) -> ModuleType | None:
    """The compiled kernels if `x [..., D]` is a decoding-sized input (≤ MAX_ROWS rows, float32, CPU) and no gradient
    is being recorded; otherwise (or where the extension does not build) None."""
    if (x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled()):
        return _kernels()
    return None


def row_kernels(x: Tensor) -> ModuleType | None:
    """The compiled kernels for a float32 CPU input of any number of rows without autograd (`rms_norm`: one pass
    per row, rows split across threads when there are many), else None."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
        return _kernels()
    return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for x [..., in], weight [out, in], bias [out] → [..., out]. `weight` may also be a
    `kitelm.ops.quant.QuantizedWeight` (bf16 / int8 / int4 storage), which takes the quantized kernels."""
    if not isinstance(weight, Tensor):
        return weight.linear(x, bias)
    kernels = decode_kernels(x) if weight.dtype == torch.float32 and not blas_streams_few_rows() else None
    return kernels.small_linear(x, weight, bias) if kernels is not None else F.linear(x, weight, bias)


@functools.cache
def blas_streams_few_rows() -> bool:
    """Whether torch's own fp32 GEMM (MKL in the CPU wheel) already streams 1-8-row products at the memory rate, so
    that `small_linear` would only slow them down. Measured (benchmarks/NOTES.md, "Decode step"): on Intel CPUs,
    MKL's vendor, it does (Sapphire-Rapids Xeon, one row of a DRAM-resident 7680×2560 matrix: F.linear 29 GB/s,
    `small_linear` 23); on the AVX2 Zen3 MKL's small-M path used one thread and a third of the bandwidth, 1.5-3×
    slower than `small_linear`."""
    from ..precision import cpu_vendor

    return cpu_vendor() == "GenuineIntel"


@functools.cache
def _kernels() -> ModuleType | None:
    """The compiled module, looked up once per process (KITELM_NO_CPP is read then), or None."""
    return EXTENSION.module()


PATHS = KernelPaths("KITELM_DECODE_ISA", ISAS, _kernels)
decode_isa = PATHS.current  # the path of rglru_step and attend_ring: KITELM_DECODE_ISA if set, else the best
available_isas = PATHS.available
