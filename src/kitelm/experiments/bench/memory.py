"""Inference memory vs context length: the bytes of the inference state (KV cache, or Griffin's conv + RG-LRU state
+ ring buffer) after `L` tokens, and the peak RSS of a process that prefills `L` tokens (one subprocess per point,
since peak RSS only grows within a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from ...presets import get_preset
from ...generate import prefill
from ...models import build_model
from ..machine import ALLOCATOR_ENV, peak_rss_bytes
from .report import model_lines

NOTE = ("State bytes: KV cache for global attention (allocation for L tokens), conv + RG-LRU state + ring "
        "buffer for Griffin/Hawk after L tokens. Peak RSS: a fresh process prefilling L tokens as `generate` does "
        "(passes of 2,048 tokens into the cache).")


def state_bytes_after(model, length: int) -> int:
    """Prefill `length` random tokens into a cache sized for them (as `generate` does); return the cache's bytes."""
    cache = model.new_cache(1, max_len=length)
    prefill(model, torch.randint(0, model.config.vocab_size, (1, length)), torch.arange(length)[None], cache)
    return cache.nbytes()


def kv_cache_bytes(model, length: int) -> int:
    """Bytes of a cache holding `length` tokens, from its allocation alone (prefilling 64k tokens of global attention
    costs O(L²) time and changes nothing about the size)."""
    return model.new_cache(1, max_len=length).nbytes()


def _peak_rss_child(name: str, length: int) -> int:
    code = ("import json, torch; from kitelm.experiments.bench.memory import _prefill_peak; "
            f"print(json.dumps(_prefill_peak({name!r}, {length})))")
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}  # the 1 GiB top pad would inflate RSS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prefill_peak(name: str, length: int) -> int:
    model = build_model(get_preset(name)).eval()
    cache = model.new_cache(1, max_len=length)
    prefill(model, torch.randint(0, model.config.vocab_size, (1, length)), torch.arange(length)[None], cache)
    return peak_rss_bytes()


def run(settings, machine: dict, log) -> list[dict]:
    rss_max_len = settings.rss_max_len
    rows = []
    for name in settings.memory_models:
        model = build_model(get_preset(name)).eval()
        bounded = model.config.arch == "griffin"
        for length in settings.memory_lengths:
            nbytes = state_bytes_after(model, length) if bounded else kv_cache_bytes(model, length)
            row = {"model": name, "context": length, "state_bytes": nbytes}
            if length <= rss_max_len:
                row["prefill_peak_rss_bytes"] = _peak_rss_child(name, length)
            rows.append(row)
            log(f"memory {name:<18} {length:>6} tokens: state {nbytes / 2**20:8.2f} MiB"
                + (f", prefill peak RSS {row['prefill_peak_rss_bytes'] / 2**20:7.0f} MiB" if "prefill_peak_rss_bytes"
                   in row else ""))
    return rows


def plot(rows: list[dict], settings, out) -> None:
    model_lines(rows, "context", "state_bytes", out / "memory_state.png", "Inference state vs context length", "bytes")
