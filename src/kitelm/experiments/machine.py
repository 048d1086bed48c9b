"""What a benchmark needs to know about the machine: allocator settings, GEMM peaks, DRAM bandwidth (timed with
`kitelm.timing`), and a description (CPU, threads, torch, commit) recorded with every result."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..precision import machine_info, native_bf16
from ..timing import time_runs

# glibc hands every freed block above 32 MiB back to the OS, so each new big tensor costs page faults and
# memory-bound CPU code runs slower (benchmarks/NOTES.md, "The allocator trap"). Keep them in the process.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                 "MALLOC_TOP_PAD_": "1073741824"}


def allocator_configured() -> bool:
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())


def reexec_with_allocator_env() -> None:
    """Restart the current command with ALLOCATOR_ENV (glibc reads it only at start-up); no-op if already set."""
    if not allocator_configured():
        # orig_argv keeps `-m kitelm` (argv[0] would be the path of __main__.py)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **ALLOCATOR_ENV})


def measured_peaks() -> dict:
    """GEMM GFLOP/s of every compute dtype and DRAM GB/s, measured now (a few seconds), for a result's machine."""
    return {"gemm_peak_gflops": {name: flops / 1e9 for name, flops in gemm_peaks().items()},
            "dram_gbps": dram_bandwidth() / 1e9}


def peaks_line(info: dict) -> str:
    """'GEMM float32 160 GFLOP/s, bfloat16 1000 GFLOP/s; DRAM 40.1 GB/s' (empty if `info` holds no peaks)."""
    if "gemm_peak_gflops" not in info:
        return ""
    gemm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in info["gemm_peak_gflops"].items())
    return f"GEMM {gemm}; DRAM {info['dram_gbps']:.1f} GB/s (add: 2 reads + 1 write)"


def gemm_peaks() -> dict[str, float]:
    """Measured GEMM FLOP/s of every compute dtype: the denominators of MFU. bf16 is probed at n = 256 where it is
    not native (~1 GFLOP/s: a 2048³ probe would take minutes), at the full size where it is."""
    return {"float32": gemm_peak_flops(), "bfloat16": gemm_peak_flops(2048 if native_bf16() else 256, torch.bfloat16)}


def gemm_peak_flops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 15, warmup: int = 3) -> float:
    """Measured matmul FLOP/s, 2n³ ÷ the fastest of `repeats` n×n×n products after `warmup` ones: the denominator of
    MFU. At n = 2048 one product is ~0.1 s on 2 cores (the probe 2-4 s), long enough to amortise thread wake-up, and
    the best of 15 rides out a busy moment of a shared machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2 * n**3 / time_runs(lambda: torch.mm(a, b, out=out), repeats, warmup)[1]


def dram_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of an out-of-place add of two `nbytes` fp32 tensors (2 reads + 1 write, far beyond any cache;
    fastest run)."""
    n = nbytes // 4
    a, b, out = torch.rand(n), torch.rand(n), torch.empty(n)
    return 3 * nbytes / time_runs(lambda: torch.add(a, b, out=out), repeats)[1]


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe() -> dict:
    """The CPU (name, the ISA flags that pick kernels and dtypes, torch's kernel level), threads, versions, allocator
    settings, commit and command: recorded with every result."""
    return {**machine_info(), "cores": os.cpu_count(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "allocator_env": allocator_configured(), "commit": git_commit(), "command": " ".join(sys.argv)}


def peak_rss_bytes() -> int:
    """Peak resident set of this process's own memory: VmHWM on Linux. Not getrusage's ru_maxrss, which a child
    started by subprocess (vfork + exec) inherits from its parent's peak, so every child would report the parent's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
