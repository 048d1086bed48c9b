"""Training throughput: tokens/s and MFU (model FLOPs per token × tokens/s ÷ the measured GEMM peak of the compute
dtype) of one AdamW step (forward + backward + update) on random tokens, for kitelm models and their HF peers at the
same configuration and dtype."""

from __future__ import annotations

import torch

from ...presets import get_preset
from ...models import build_model
from ...timing import median_seconds, training_step
from .peers import peer_for

NOTE = ("One AdamW step (forward + backward + update) on random tokens, matrix products in the compute dtype "
        "(bf16 autocast where native); MFU = tokens/s × model FLOPs per token (6·N + attention, kitelm's count for "
        "both implementations) ÷ the measured GEMM peak of that dtype.")
NEEDS_GEMM_PEAK = True  # `run_bench` measures the GEMM peak first (recorded with the machine)


def run(settings, machine: dict, log) -> list[dict]:
    dtype = machine["dtype"]
    batch_size, seq_len, peak_flops = settings.batch_size, settings.seq_len, machine["gemm_peak_gflops"][dtype] * 1e9
    rows = []
    for name in settings.train_models:
        config = get_preset(name)
        ours = build_model(config).train()
        flops = ours.flops_per_token(seq_len)
        batch = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
        candidates = [("kitelm", ours, False)]
        peer = peer_for(config) if settings.peers else None
        if peer is not None:
            candidates.append((peer[0], peer[1].train(), True))
        for impl, model, hf in candidates:
            seconds = median_seconds(training_step(model, batch, hf, getattr(torch, dtype)),
                                     repeats=settings.repeats, warmup=2)
            tps = batch_size * seq_len / seconds
            rows.append({"model": name, "impl": impl, "dtype": dtype,
                         "params": sum(p.numel() for p in model.parameters()),
                         "batch": batch_size, "seq_len": seq_len, "step_ms": 1e3 * seconds, "tokens_per_s": tps,
                         "flops_per_token": flops, "mfu": tps * flops / peak_flops})
            log(f"train {name:<18} {impl:<28} {tps:9.0f} tok/s  MFU {rows[-1]['mfu']:.2f}")
    return rows
