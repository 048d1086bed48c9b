"""Kernels for prefill: many tokens per call, fp32, on CPU, without autograd (csrc/prefill_kernels.cpp).

`rglru_scan` fuses the RG-LRU's elementwise gate maths into its scan (one pass instead of ~12 torch ops, each with a
thread barrier: benchmarks/NOTES.md, "Prefill at the GEMM bound"). `RGLRU.forward` calls it when
`prefill_kernels(x)` says it applies; the pure-torch path (`RGLRU._gated` + `linear_scan`) runs everywhere else and
is the twin the kernel is tested against (tests/test_prefill.py). Only the AVX-512 path is used by default: the
portable C++ one (std::exp per element) is the reference form, slower than torch's vectorized ops.
`KITELM_PREFILL_ISA=portable|avx512` forces one (tests), `KITELM_NO_CPP=1` turns the kernels off.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

from .extension import CppExtension, isas_up_to, resolve_isa

ISAS = {"portable": 0, "avx512": 2}
EXTENSION = CppExtension("prefill_kernels", fallback="prefill uses the pure-torch RG-LRU",
                         cflags=("-O3", "-fopenmp"))  # baseline x86-64: the AVX-512 path carries a target attribute


def prefill_kernels(x: Tensor) -> ModuleType | None:
    """The compiled kernels if `x [B, T, L]` is a float32 CPU input of more than one token, no gradient is being
    recorded, CPU autocast is off and a path applies (AVX-512, or one forced by KITELM_PREFILL_ISA); otherwise None."""
    if (x.dim() != 3 or x.shape[1] < 2 or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")):  # autocast would hand the kernel bf16 gate matmuls
        return None
    kernels = _kernels()
    if kernels is None or (not os.environ.get("KITELM_PREFILL_ISA") and kernels.best_isa() < ISAS["avx512"]):
        return None
    return kernels


def prefill_isa() -> int:
    """KITELM_PREFILL_ISA if set, else the fastest path this CPU runs."""
    return _isa(os.environ.get("KITELM_PREFILL_ISA", ""))


@functools.cache
def _isa(forced: str) -> int:
    kernels = _kernels()
    return resolve_isa("KITELM_PREFILL_ISA", forced, ISAS, kernels.best_isa() if kernels is not None else 0)


def available_isas() -> list[str]:
    kernels = _kernels()
    return isas_up_to(ISAS, kernels.best_isa() if kernels is not None else -1)


@functools.cache
def _kernels() -> ModuleType | None:
    return EXTENSION.module()
