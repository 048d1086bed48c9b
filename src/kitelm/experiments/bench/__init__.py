"""`kitelm bench`: speed and memory measured side by side with the peers, written to a results folder.

Experiments: scan (the RG-LRU linear scan vs the DRAM bandwidth floor and the Python loop), train (tokens/s and MFU),
sample (throughput vs generation length, RecurrentGemma Fig. 1a), memory (state bytes and peak RSS vs context),
params (every preset). `BenchSettings.quick()` shrinks every experiment to finish in about two minutes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ...errors import KitelmError
from ...precision import dtype_name, resolve_dtype
from .. import machine
from ..settings import BenchSettings
from . import decode, memory, params, report, sample, scan, serve, train

# name → module with `NOTE` (what is measured, for results.md), `run(settings, machine, log) -> rows` and optionally
# `plot(rows, settings, out)`. A new experiment is one more module here and its sizes in `BenchSettings`.
EXPERIMENTS = {"scan": scan, "train": train, "sample": sample, "memory": memory, "params": params, "decode": decode,
               "serve": serve}


def run_bench(names: list[str], out: str | Path, settings: BenchSettings,
              log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise KitelmError(f"unknown benchmark(s) {unknown}; choose from {list(EXPERIMENTS)}")
    settings.check()
    torch.manual_seed(0)
    info = machine.describe()
    info["dtype"] = dtype_name(resolve_dtype(settings.dtype))
    log(f"machine: {info['cpu']} ({', '.join(info['cpu_flags'])}), {info['threads']} threads, torch {info['torch']}, "
        f"compute dtype {info['dtype']}")
    if any(getattr(EXPERIMENTS[n], "NEEDS_GEMM_PEAK", False) for n in names):
        info.update(machine.measured_peaks())
        log(f"measured {machine.peaks_line(info)}")
    results: dict[str, list[dict]] = {}
    for name in names:
        start = time.perf_counter()
        results[name] = EXPERIMENTS[name].run(settings, info, log)
        log(f"{name}: {time.perf_counter() - start:.0f} s")
        report.write(Path(out), info, settings, results, EXPERIMENTS)  # after each experiment: partial results
    return results
