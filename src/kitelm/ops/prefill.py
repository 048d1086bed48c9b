"""Kernels for prefill: many tokens per call, fp32, on CPU, without autograd (csrc/prefill_kernels.cpp).

`rglru_scan` fuses the RG-LRU's elementwise gate maths into its scan (one pass instead of ~12 torch ops, each with a
thread barrier: benchmarks/NOTES.md, "Prefill at the GEMM bound"). `RGLRU.forward` calls it when
`prefill_kernels(x)` says it applies; the pure-torch path (`RGLRU._gated` + `linear_scan`) runs everywhere else and
is the twin the kernel is tested against (tests/test_prefill.py). The AVX-512 or AVX2 path is used by default, the
best the CPU has; the portable C++ one (std::exp per element) is the reference form, slower than torch's vectorized
ops, so without AVX2 the torch twins run. `KITELM_PREFILL_ISA=portable|avx2|avx512` forces one (tests),
`KITELM_NO_CPP=1` turns the kernels off.

Two epilogues of the bf16 GEMM path share the extension: `gelu_mul` (a GeGLU's gelu_tanh(a + b_a) · (b + b_b) in
one pass, from bf16 GEMM outputs straight to the bf16 input of the next GEMM) and `add_bias_into` (a bf16 product
into float32 y with its bias). Each has its pure-torch twin here (`gelu_mul_reference`, `add_bias_reference`), which
runs wherever the kernels do not (other devices, autograd, CPUs without AVX2). So does `soft_cap`, the output
head's cap·tanh(logits / cap) in place (twin `soft_cap_reference`): torch's tanh costs ~0.3 ms over RecurrentGemma's
256,000 logits of a decoding step on the AVX-512 Zen5, the kernel 0.04 (benchmarks/NOTES.md, "The Python beside the
kernels").
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .extension import CppExtension, KernelPaths

ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
EXTENSION = CppExtension("prefill_kernels", fallback="prefill uses the pure-torch RG-LRU",
                         cflags=("-O3", "-fopenmp"))  # baseline x86-64: the vector paths carry target attributes


def prefill_kernels(x: Tensor) -> ModuleType | None:
    """The compiled kernels if `x [B, T, L]` is a float32 CPU input of more than one token, no gradient is being
    recorded, CPU autocast is off and a path applies (AVX2 or AVX-512, or one forced by KITELM_PREFILL_ISA);
    otherwise None."""
    if (x.dim() != 3 or x.shape[1] < 2 or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")):  # autocast would hand the kernel bf16 gate matmuls
        return None
    return _kernels_with_a_path()


def epilogue_kernels(*tensors: Tensor) -> ModuleType | None:
    """The compiled kernels for an epilogue over `tensors` (float32 / bf16 CPU tensors, no gradient recorded, a path
    that applies as for `prefill_kernels`), else None."""
    if torch.is_grad_enabled() or any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16)
                                      for t in tensors):
        return None
    return _kernels_with_a_path()


def _kernels_with_a_path() -> ModuleType | None:
    """The compiled kernels where a path applies: AVX2 or AVX-512 (the portable one is slower than torch), or one
    forced by KITELM_PREFILL_ISA."""
    kernels = _kernels()
    if kernels is None or (kernels.best_isa() < ISAS["avx2"] and not PATHS.forced()):
        return None
    return kernels


def gelu_mul(a: Tensor, b: Tensor, a_bias: Tensor | None = None, b_bias: Tensor | None = None,
             out_dtype: torch.dtype = torch.float32) -> Tensor:
    """gelu_tanh(a + a_bias) · (b + b_bias) → [..., C] in `out_dtype` (float32 or bfloat16), computed in float32;
    a, b [..., C] float32 or bfloat16 (GEMM outputs), biases [C] float32 or None."""
    kernels = epilogue_kernels(a, b)
    if kernels is None or out_dtype not in (torch.float32, torch.bfloat16) or a.shape != b.shape:
        return gelu_mul_reference(a, b, a_bias, b_bias, out_dtype)  # (the twin also broadcasts)
    c = a.shape[-1]
    y = kernels.gelu_mul(_rows(a, c), _float_bias(a_bias), _rows(b, c), _float_bias(b_bias),
                         out_dtype == torch.bfloat16, prefill_isa())
    return y.reshape(a.shape)


def _rows(t: Tensor, c: int) -> Tensor:
    """t as [N, c] with unit column stride (a view where one exists), as the kernels take it."""
    t = t.reshape(-1, c)
    return t if t.stride(-1) == 1 else t.contiguous()


def gelu_mul_reference(a: Tensor, b: Tensor, a_bias: Tensor | None = None, b_bias: Tensor | None = None,
                       out_dtype: torch.dtype = torch.float32) -> Tensor:
    """`gelu_mul` in pure torch (its twin): the same float32 operations, one torch op each."""
    g, u = a.float(), b.float()
    g = g if a_bias is None else g + a_bias.float()
    u = u if b_bias is None else u + b_bias.float()
    return (F.gelu(g, approximate="tanh") * u).to(out_dtype)


def soft_cap(logits: Tensor, cap: float) -> Tensor:
    """cap · tanh(logits / cap) (the soft cap of Gemma-family logits), in place where the kernel applies (a float32
    contiguous CPU tensor, no gradient recorded): `logits` must be a tensor the caller owns, e.g. a product just
    computed. Elsewhere the twin's new tensor."""
    kernels = epilogue_kernels(logits) if logits.dtype == torch.float32 and logits.is_contiguous() else None
    if kernels is None:
        return soft_cap_reference(logits, cap)
    return kernels.soft_cap_(logits, cap, prefill_isa())


def soft_cap_reference(logits: Tensor, cap: float) -> Tensor:
    """`soft_cap`'s twin: cap · tanh(logits / cap) in torch ops."""
    return cap * torch.tanh(logits / cap)


def add_bias_into(src: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """out [N, C] (float32 or bf16; may be a column slice of a wider tensor) = src [N, C] + bias [C], in float32."""
    kernels = epilogue_kernels(src, out)
    if kernels is None or src.dim() != 2 or out.stride(-1) != 1:
        out.copy_(add_bias_reference(src, bias))
        return
    kernels.add_bias_into(src, _float_bias(bias), out, prefill_isa())


def add_bias_reference(src: Tensor, bias: Tensor | None) -> Tensor:
    """`add_bias_into`'s twin: src + bias in float32."""
    return src.float() if bias is None else src.float() + bias.float()


def _float_bias(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.float()


@functools.cache
def _kernels() -> ModuleType | None:
    return EXTENSION.module()


PATHS = KernelPaths("KITELM_PREFILL_ISA", ISAS, _kernels)
prefill_isa = PATHS.current  # KITELM_PREFILL_ISA if set, else the fastest path this CPU runs
available_isas = PATHS.available
