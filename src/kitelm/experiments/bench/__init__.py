"""`kitelm bench`: speed and memory measured side by side with the peers, written to a results folder.

Experiments: scan (the RG-LRU linear scan vs the DRAM bandwidth floor and the Python loop), train (tokens/s and MFU),
sample (throughput vs generation length, RecurrentGemma Fig. 1a), memory (state bytes and peak RSS vs context),
params (every preset). `quick=True` shrinks every experiment to finish in about two minutes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import KitelmError
from . import machine, memory, params, report, sample, train

EXPERIMENTS = ("scan", "train", "sample", "memory", "params")


@dataclass
class BenchSettings:
    train_models: list[str] = field(default_factory=lambda: ["transformer-small", "sas-p-small", "hawk-small",
                                                             "griffin-small"])
    batch_size: int = 8
    seq_len: int = 512
    repeats: int = 5
    sample_models: list[str] = field(default_factory=lambda: ["griffin-small", "transformer-small"])
    prompt_len: int = 2048
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    peer_max_len: int = 4096
    memory_models: list[str] = field(default_factory=lambda: ["griffin-small", "hawk-small", "transformer-small"])
    memory_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    rss_max_len: int = 16384
    scan_shapes: list[tuple[int, int, int]] = field(default_factory=lambda: [(8, 4096, 1024), (8, 1024, 256)])
    dtype: str = "float32"
    peers: bool = True  # also measure the installed HF peers (train, sample)

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(batch_size=4, seq_len=256, repeats=2, prompt_len=256, lengths=[64, 256, 1024], peer_max_len=256,
                   memory_lengths=[1024, 4096], rss_max_len=4096, scan_shapes=[(4, 1024, 256)],
                   train_models=["transformer-small", "griffin-small"])

    def check(self) -> None:
        """Refuse impossible sizes before any work starts."""
        from ..config import get_preset

        for name in {*self.train_models, *self.sample_models, *self.memory_models}:
            get_preset(name)
        total = _total_memory_bytes()
        for name in self.memory_models:
            config = get_preset(name)
            if config.arch != "griffin":
                kv = 2 * config.n_layers * config.kv_heads * config.dim_per_head * 4 * max(self.memory_lengths)
                if total and kv > 0.8 * total:
                    raise KitelmError(f"a {max(self.memory_lengths):,}-token KV cache of {name} needs "
                                      f"{kv / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB; "
                                      "use shorter memory lengths")
        if any(n <= 0 for n in (self.batch_size, self.seq_len, self.repeats, self.prompt_len, *self.lengths)):
            raise KitelmError("benchmark sizes must be positive integers")


def _total_memory_bytes() -> int | None:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


NOTES = {
    "train": "One AdamW step (forward + backward + update) on random tokens; MFU = tokens/s × model FLOPs per token "
             "(6·N + attention, kitelm's count for both implementations) ÷ measured fp32 GEMM peak.",
    "sample": "Greedy decoding at batch 1 after the prompt; throughput = N / time to the N-th token; decode rate = "
              "tokens/s over the last 10 % of those N tokens. HF peers are capped at `peer_max_len` (their caches "
              "grow by concatenation).",
    "memory": "State bytes: KV cache for global attention (allocation for L tokens), conv + RG-LRU state + ring "
              "buffer for Griffin/Hawk after L tokens. Peak RSS: a fresh process prefilling L tokens as `generate` does "
              "(passes of 2,048 tokens into the cache).",
    "scan": "h_t = a_t·h_{t-1} + x_t in fp32; effective GB/s counts 12 B/elem forward, 32 B/elem forward+backward; "
            "floor = bytes ÷ measured DRAM bandwidth (256 MiB add).",
    "params": "Every preset, built on the meta device.",
}


def run_bench(names: list[str], out: str | Path, settings: BenchSettings,
              log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise KitelmError(f"unknown benchmark(s) {unknown}; choose from {list(EXPERIMENTS)}")
    settings.check()
    torch.manual_seed(0)
    info = machine.describe()
    log(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, fp32")
    needs_peak = "train" in names
    peak = machine.gemm_peak_flops() if needs_peak else None
    if peak:
        info["gemm_peak_gflops"] = peak / 1e9
        log(f"measured fp32 GEMM peak: {peak / 1e9:.0f} GFLOP/s")
    results: dict[str, list[dict]] = {}
    for name in names:
        start = time.perf_counter()
        if name == "params":
            results[name] = params.run(log)
        elif name == "train":
            results[name] = train.run(settings.train_models, settings.batch_size, settings.seq_len, peak,
                                      settings.repeats, log, settings.peers)
        elif name == "sample":
            results[name] = sample.run(settings.sample_models, settings.prompt_len, settings.lengths,
                                       settings.peer_max_len, log, settings.peers)
        elif name == "memory":
            results[name] = memory.run(settings.memory_models, settings.memory_lengths, settings.rss_max_len, log)
        elif name == "scan":
            from .scan import run_scan_bench

            results[name] = run_scan_bench(settings.scan_shapes, settings.repeats)
        log(f"{name}: {time.perf_counter() - start:.0f} s")
        report.write(Path(out), info, asdict(settings), results, NOTES)  # after each experiment: partial results
    return results
