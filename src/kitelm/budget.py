"""`kitelm train --minutes N`: the step count that fits a wall-clock budget, from a few timed steps of the run's own
model, batch and dtype on this machine (as `kitelm reproduce` plans its budget), so that the schedule (warmup,
cosine decay) spans the time the user has rather than stopping part-way.

The budget covers the whole command: what already ran (start-up, corpus, tokenizer), the timing itself, training,
the periodic and final evaluations, the compressors of the report and the generated sample.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .errors import KitelmError

TIMED_STEPS = 3  # after one warm-up step; the median is the step time
SAFETY = 0.95  # of the time left for training: a shared machine's speed drifts by ±10 % over minutes
XZ_BYTES_PER_S = 1.2e6  # lzma preset 9 on one core (measured 1.3 MB/s on the 11.7 MB stdlib train split)
SAMPLE_S = 5.0  # the 300-token sample at the end (batch-1 decoding, ~0.01 s per token on 2 CPU cores)


@dataclass
class Fit:
    steps: int
    step_s: float  # one optimizer step (all micro-batches)
    overhead_s: float  # evaluations, compressors, sample: not training
    elapsed_s: float  # spent before training (start-up, data, timing)


def time_step(trainer) -> tuple[float, float]:
    """(seconds of one optimizer step, seconds of one evaluation batch) of a copy of the trainer's model: the run's
    own model, micro-batch, context, accumulation and dtype; the run's model and optimizer are not touched."""
    from .precision import autocast
    from .timing import median_seconds, training_step

    tc = trainer.tc
    model = copy.deepcopy(trainer.model).train()
    micro = tc.batch_size // trainer.dist.world
    batch = torch.randint(0, trainer.tokenizer.vocab_size, (micro, tc.seq_len + 1))
    step = training_step(model, batch, dtype=trainer.compute_dtype)
    step_s = tc.grad_accum * median_seconds(step, TIMED_STEPS)
    model.eval()

    def forward():
        with torch.no_grad(), autocast(trainer.compute_dtype):
            model(batch[:, :-1])

    return step_s, median_seconds(forward, 2)


def fit_steps(minutes: float, elapsed_s: float, step_s: float, eval_batch_s: float, *, eval_every: int,
              eval_windows: int, final_windows: int, batch_size: int, xz_bytes: int = 0, sample: bool = True,
              cores: int = 2) -> Fit:
    """The most steps whose estimated time, with `elapsed_s` already spent, fits `minutes`. Evaluations run
    `eval_windows` windows every `eval_every` steps and `final_windows` at the end, in batches of `batch_size` at
    `eval_batch_s` each; `xz_bytes` are bytes the report's compressors have not cached yet (in parallel threads).
    A budget too small for one step raises KitelmError with the budget it would need."""
    batches = lambda windows: math.ceil(windows / batch_size)  # noqa: E731
    fixed = (batches(final_windows) * eval_batch_s + xz_bytes / XZ_BYTES_PER_S / max(1, min(3, cores))
             + (SAMPLE_S if sample else 0.0))
    per_step = step_s + batches(eval_windows) * eval_batch_s / eval_every
    left = SAFETY * (60 * minutes - elapsed_s - fixed)
    steps = int(left // per_step) if left > 0 else 0
    if steps < 1:
        need = (elapsed_s + fixed + per_step / SAFETY) / 60
        raise KitelmError(f"--minutes {minutes:g} is too small for this run: start-up took {elapsed_s:.0f} s, one "
                          f"training step takes {step_s:.1f} s and the evaluation and report about {fixed:.0f} s on "
                          f"this machine; give --minutes {math.ceil(need * 10) / 10:g} or more (or a smaller "
                          "--batch-size / model)")
    return Fit(steps, step_s, fixed + steps * (per_step - step_s), elapsed_s)
