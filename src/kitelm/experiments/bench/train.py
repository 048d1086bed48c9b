"""Training throughput: tokens/s and MFU (model FLOPs per token × tokens/s ÷ the measured GEMM peak of the compute
dtype) of one AdamW step (forward + backward + update) on random tokens, for kitelm models and their HF peers at the
same configuration and dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...presets import get_preset
from ...models import build_model
from ...precision import autocast
from ..machine import median_seconds
from .peers import peer_for

NOTE = ("One AdamW step (forward + backward + update) on random tokens, matrix products in the compute dtype "
        "(bf16 autocast where native); MFU = tokens/s × model FLOPs per token (6·N + attention, kitelm's count for "
        "both implementations) ÷ the measured GEMM peak of that dtype.")
NEEDS_GEMM_PEAK = True  # `run_bench` measures the GEMM peak first (recorded with the machine)


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
