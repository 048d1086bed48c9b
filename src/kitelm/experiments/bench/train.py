"""Training throughput: tokens/s and MFU (model FLOPs per token × tokens/s ÷ measured GEMM peak) of one AdamW step
(forward + backward + update) on random tokens, for kitelm models and their HF peers at the same configuration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import get_preset
from ..models import build_model
from .machine import median_seconds
from .peers import peer_for


def _step_fn(model, batch: torch.Tensor, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        if hf:
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        else:
            logits = model(batch[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(models: list[str], batch_size: int, seq_len: int, peak_flops: float, repeats: int, log,
        peers: bool = True) -> list[dict]:
    rows = []
    for name in models:
        config = get_preset(name)
        ours = build_model(config).train()
        flops = ours.flops_per_token(seq_len)
        batch = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
        candidates = [("kitelm", ours, False)]
        peer = peer_for(config) if peers else None
        if peer is not None:
            candidates.append((peer[0], peer[1].train(), True))
        for impl, model, hf in candidates:
            seconds = median_seconds(_step_fn(model, batch, hf), repeats=repeats, warmup=2)
            tps = batch_size * seq_len / seconds
            rows.append({"model": name, "impl": impl, "params": sum(p.numel() for p in model.parameters()),
                         "batch": batch_size, "seq_len": seq_len, "step_ms": 1e3 * seconds, "tokens_per_s": tps,
                         "flops_per_token": flops, "mfu": tps * flops / peak_flops})
            log(f"train {name:<18} {impl:<28} {tps:9.0f} tok/s  MFU {rows[-1]['mfu']:.2f}")
    return rows
