"""Learning-rate schedule: linear warmup, then cosine or linear decay to `min_ratio · peak` (or constant)."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.1) -> float:
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return peak * (min_ratio + (1 - min_ratio) * decay)
