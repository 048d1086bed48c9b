"""`TrainConfig`: the options of a training run, validated on construction. Plain data without torch, so the
command line can show its defaults without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..precision import DTYPES
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    data: str | None = None  # None = the Python standard library corpus
    task: str | None = None  # a synthetic task (kitelm.data.tasks) instead of a corpus
    tokenizer: str = "byte"  # byte | bpe:N
    # The defaults are the main job (`kitelm train`): griffin-mini, 300 steps × 32 × 256 tokens, which beats xz -9
    # (benchmarks/NOTES.md, "The main job against xz"); ~9 minutes on 2 AVX2 cores in fp32, ~4 where bf16 is native.
    steps: int = 300
    batch_size: int = 32  # global sequences per micro-batch (split across processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 150
    eval_tokens: int = 32_768  # validation tokens per periodic evaluation
    save_every: int = 150
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    dtype: str = "auto"  # compute dtype: auto (bf16 autocast where the CPU/GPU has native bf16) | float32 | bfloat16

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid training option: {msg}")

        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_tokens", "save_every",
                     "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "beta1", "beta2"):
            need(math.isfinite(getattr(self, name)), f"{name}={getattr(self, name)} must be a finite number")
        need(self.lr > 0, f"lr={self.lr} must be positive")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas ({self.beta1}, {self.beta2}) must be in [0, 1)")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; choose one of {list(SCHEDULES)}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        need(self.keep_last >= 1, f"keep_last={self.keep_last} must be at least 1")
        need(self.dtype in DTYPES, f"dtype={self.dtype!r}; choose one of {list(DTYPES)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


