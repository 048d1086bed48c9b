"""Budget planning of `kitelm reproduce`: training time is estimated as tokens × `flops_per_token` ÷ R, where R
(FLOP/s) is measured by timing a few AdamW steps of `transformer-small` on this machine; the tiny models of the tasks
experiment are timed directly instead (their steps are bound by per-operation overhead, not FLOPs). The training
steps of every experiment scale with the budget, down to `MIN_STEPS` (below that the run stops at once with the
budget it would need)."""

from __future__ import annotations

import math

import torch

from ...data.tasks import get_task
from ...errors import KitelmError
from ...models import build_model
from ...precision import resolve_dtype
from ...presets import get_preset
from ...timing import median_seconds, training_step
from ..settings import DEFAULT_STEPS, TASK_STEPS_PER_STEP, ReproduceScale

REFERENCE_MINUTES = 60.0
MIN_STEPS = 30  # fewer steps than this measure nothing
DECODE_S_PER_TOKEN = 0.01  # batch-1 decoding of a small model on 2 CPU cores, with margin
SUBPROCESS_S = 6.0  # a fresh Python with torch, for one peak-RSS point
EVAL_OVERHEAD = 1.2  # training time + 20 % for evaluation and checkpoints


def train_tokens(scale: ReproduceScale) -> list[tuple[str, int, int]]:
    """(preset, tokens, context) of every text training run."""
    runs = [(p, scale.steps * scale.batch_size * scale.seq_len, scale.seq_len) for _, p in scale.block_variants
            for _ in range(scale.seeds)]
    return runs + [(p, scale.steps * scale.batch_size * scale.seq_len, scale.seq_len) for _, p in scale.lm_models]


def estimate_seconds(scale: ReproduceScale, flops_per_s: float, task_step_s: float) -> float:
    """Training (+20 % for evaluation and checkpoints; `task_step_s`: seconds of one step of every tasks-experiment
    run together), timed steps, decoding, prefills and RSS subprocesses."""
    def cost(preset: str, tokens: int, context: int) -> float:
        return tokens * build_model(get_preset(preset), device="meta").flops_per_token(context) / flops_per_s

    train = sum(cost(*run) for run in train_tokens(scale)) + scale.task_steps * task_step_s
    timed = sum(cost(p, (scale.repeats + 2) * scale.batch_size * scale.seq_len, scale.seq_len)
                for p in scale.throughput_models)
    decode = len(scale.sample_models) * (scale.prompt_len + max(scale.sample_lengths)) * DECODE_S_PER_TOKEN
    prefill = sum(cost(p, sum(scale.memory_lengths), 1024) / 3 for p in scale.memory_models)
    rss = SUBPROCESS_S * len(scale.memory_models) * sum(n <= scale.rss_max_len for n in scale.memory_lengths)
    return EVAL_OVERHEAD * train + timed + decode + prefill + rss


def measure_training_flops(dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of `transformer-small` AdamW steps (batch 4 × 128) in `dtype` on this machine, with kitelm's FLOP
    count."""
    model = build_model(get_preset("transformer-small")).train()
    batch = torch.randint(0, model.config.vocab_size, (4, 129))
    seconds = median_seconds(training_step(model, batch, dtype=dtype), repeats=3, warmup=1)
    return 4 * 128 * model.flops_per_token(128) / seconds


def measure_task_step_seconds(scale: ReproduceScale, dtype: torch.dtype = torch.float32) -> float:
    """Seconds of one AdamW step of every (task, model) run of the tasks experiment together, timed on this machine."""
    total = 0.0
    for task in scale.tasks:
        n = get_task(task).seq_len
        for _, config in scale.task_configs():
            model = build_model(config.replace(vocab_size=get_task(task).vocab_size)).train()
            batch = torch.randint(0, model.config.vocab_size, (scale.batch_size, n + 1))
            total += median_seconds(training_step(model, batch, dtype=dtype), repeats=3, warmup=1)
    return total


def plan(budget_minutes: float, flops_per_s: float | None = None, dtype: str = "auto",
         task_step_s: float | None = None) -> ReproduceScale:
    """The largest scale whose estimate fits the budget: steps = DEFAULT_STEPS · f with the estimate affine in f;
    every run computes in `dtype` (timed in it)."""
    flops_per_s = flops_per_s or measure_training_flops(resolve_dtype(dtype))
    task_step_s = task_step_s or measure_task_step_seconds(ReproduceScale(), resolve_dtype(dtype))
    fixed = estimate_seconds(ReproduceScale(steps=0, task_steps=0), flops_per_s, task_step_s)
    per_f = estimate_seconds(ReproduceScale(), flops_per_s, task_step_s) - fixed  # DEFAULT_STEPS steps in every run
    f = (60 * budget_minutes - fixed) / per_f
    if f * DEFAULT_STEPS < MIN_STEPS:
        need = (fixed + per_f * MIN_STEPS / DEFAULT_STEPS) / 60
        raise KitelmError(f"--budget-minutes {budget_minutes:g} is too small: the smallest reproduction ({MIN_STEPS} "
                          f"training steps per model) needs about {math.ceil(need)} minutes on this machine; "
                          f"give --budget-minutes {math.ceil(need)} or more")
    steps = int(DEFAULT_STEPS * f)
    return ReproduceScale(steps=steps, task_steps=TASK_STEPS_PER_STEP * steps, dtype=dtype)
