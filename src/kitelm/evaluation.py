"""Held-out evaluation in units that compare across tokenizers and with classical compressors.

bits per byte = Σ next-token loss (nats) / (ln 2 · UTF-8 bytes of the text those tokens encode).
gzip -9 and xz -9 (Python's `gzip` / `lzma`, the same algorithms and levels) compress exactly that text.
"""

from __future__ import annotations

import gzip
import lzma
import math

import numpy as np

from .data.dataset import validation_windows
from .train.trainer import evaluate


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    return {"gzip -9": 8 * len(gzip.compress(data, compresslevel=9)) / len(data),
            "xz -9": 8 * len(lzma.compress(data, preset=9)) / len(data)}


def evaluate_bits_per_byte(model, tokens: np.ndarray, tokenizer, seq_len: int, max_tokens: int | None = None,
                           batch_size: int = 16) -> dict:
    """Loss over consecutive windows of the first `max_tokens` tokens, in nats/token and bits/byte, with gzip and xz
    on the text of the same target tokens."""
    windows = validation_windows(tokens, seq_len, max_tokens)
    total, count = evaluate(model, windows, batch_size)
    targets = windows[:, 1:].reshape(-1).tolist()
    data = tokenizer.decode(targets).encode("utf-8")
    return {"loss": total / count, "tokens": count, "bytes": len(data),
            "bits_per_byte": total / (math.log(2) * len(data)), **compressor_bits_per_byte(data)}
