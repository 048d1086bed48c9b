"""The compute dtype, chosen from the machine: bf16 autocast where bf16 matrix math is native, float32 elsewhere.

`--dtype auto` (the default of every command) resolves to

* `torch.bfloat16` on a CPU with AVX512-BF16 or AMX-BF16 instructions, or a CUDA device that supports bf16: there
  bf16 GEMMs run 4-6× faster than fp32 (733 vs 189 GFLOP/s on an AVX-512 Zen5, ~1,000 vs ~160 on an AMX Xeon;
  benchmarks/NOTES.md);
* `torch.float32` everywhere else: an AVX2-only CPU has no bf16 GEMM path (1.3 GFLOP/s measured, ~130× slower).

Training and evaluation with bf16 run under autocast: the weights, the optimizer state and the loss stay fp32, and
the RG-LRU recurrence with its state accumulates in fp32 whatever its inputs (`ops/scan.py`). float16 is refused on
a CPU: it has no path faster than bf16 there (0.3 GFLOP/s on the Zen5; 169 GFLOP/s, fp32's speed, with the Xeon's
AVX512-FP16) and a narrower exponent range.
"""

from __future__ import annotations

import functools
import platform
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16")  # the --dtype choices; this module imports torch only when called, so the
# command line can list them without importing torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the native bf16 dot-product instructions
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                      "amx_tile", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=None)
def _cpuinfo(key: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with `key`, or None (no such line, or no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU as /proc/cpuinfo names them (empty where that file does not exist)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...), or "" where there is none."""
    return _cpuinfo("vendor_id") or ""


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a benchmark or a run records about the CPU: its name, the flags that decide kernels and dtypes, torch's
    kernel level (`ATEN_CPU_CAPABILITY` can lower it) and the dtype `auto` picks."""
    import torch

    flags = cpu_flags()
    return {"cpu": cpu_name(), "cpu_flags": [f for f in REPORTED_CPU_FLAGS if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "auto_dtype": dtype_name(resolve_dtype("auto"))}


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matrix products run on native instructions (and so faster than fp32): on a CPU, the bf16
    flags and torch's AVX-512 kernels (`ATEN_CPU_CAPABILITY=avx2` on such a CPU leaves torch without its bf16
    kernels: its bf16 attention then fails with "pack_vnni2 is only supported when avx512 is supported")."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS) and not bf16_kernels_capped()
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu",
                  compute: bool = True) -> torch.dtype:
    """'auto' (or None) → bf16 where native on `device`, else float32; 'float32' / 'bfloat16' (or the torch dtypes)
    as given. Anything else raises ConfigError; so does bf16 `compute` where torch cannot run it (storage only, e.g.
    an export, is allowed)."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
    if name in ("float16", "half") and torch.device(device).type == "cpu":
        raise ConfigError("dtype float16 is refused on a CPU: it is never faster than bfloat16 there (0.3 GFLOP/s "
                          "on a Zen5) and has a narrow range; use --dtype bfloat16 (where the CPU has AVX512-BF16/AMX) "
                          "or float32")
    known = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16}
    if name not in known:
        raise ConfigError(f"dtype {name!r} is unknown; choose one of {list(DTYPES)}")
    if compute and known[name] == torch.bfloat16 and torch.device(device).type == "cpu" and bf16_kernels_capped():
        raise ConfigError("bfloat16 cannot run with ATEN_CPU_CAPABILITY below avx512 on this CPU (which has native "
                          "bf16): torch's bf16 attention then fails; unset ATEN_CPU_CAPABILITY or use --dtype float32")
    return known[name]


def bf16_kernels_capped() -> bool:
    """True on a CPU with native bf16 whose torch kernels were capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2)."""
    import torch

    capped = not torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return capped and any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


def autocast(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The context that runs matrix products in `dtype` while parameters stay fp32 (a no-op for float32)."""
    import torch

    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inference_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """The weight dtype for generation. 'auto' is bf16 on a GPU that supports it and float32 on a CPU: batch-1
    decoding there runs kitelm's fp32 C++ kernels (`ops/decode.py`), which measured faster than bf16 through torch's
    generic path on every CPU tried, native bf16 or not (griffin-small 1.7 vs 4.2 ms/token on an AMX Xeon;
    benchmarks/NOTES.md). Explicit dtypes are resolved as `resolve_dtype` does."""
    import torch

    if (dtype is None or dtype == "auto") and torch.device(device).type == "cpu":
        return torch.float32
    return resolve_dtype(dtype, device)
