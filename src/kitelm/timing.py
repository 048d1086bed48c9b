"""Timing for the library and the experiments: wall seconds of a function (median and fastest of several runs), and
one AdamW training step of a model as a function to time (`kitelm train --minutes` sizes a run with it; `kitelm
bench train` and `kitelm reproduce` measure with it)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .precision import autocast


def time_runs(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(median, fastest) wall seconds of fn() over `repeats` runs after `warmup` runs. On a shared machine the
    fastest run is the best estimate of what the code does alone; the median shows how noisy the machine was."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    return time_runs(fn, repeats, warmup)[0]


def training_step(model, batch: torch.Tensor, hf: bool = False, dtype: torch.dtype = torch.float32):
    """A function running one AdamW step of `model` on `batch [B, T+1]` (next-token loss; `hf`: a transformers
    model), matrix products in `dtype` under autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        with autocast(dtype):
            if hf:
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            else:
                logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
