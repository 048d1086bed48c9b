"""Sampling throughput vs generation length (RecurrentGemma report, Figure 1a): after a prompt of `prompt_len`
tokens, greedy-decode up to max(lengths) tokens at batch 1 and record when each token arrives. For every length N
it reports N / (time to the N-th token) and the decode rate around context N (over the last 10 % of those tokens)."""

from __future__ import annotations

import time

import torch

from ...presets import get_preset
from ...generate import Sampling, generate_tokens
from ...models import build_model
from .peers import hf_token_arrivals, peer_for
from .report import model_lines

NOTE = ("Greedy decoding at batch 1 after the prompt; throughput = N / time to the N-th token; decode rate = "
        "tokens/s over the last 10 % of those N tokens. HF peers are capped at `peer_max_len` (their caches "
        "grow by concatenation).")


def _arrivals_ours(model, prompt: list[int], n: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    times = [time.perf_counter() for _ in generate_tokens(model, [prompt], n, Sampling(temperature=0))]
    return start, times


def _summarise(start: float, times: list[float], lengths: list[int]) -> list[dict]:
    out = []
    for n in lengths:
        if n > len(times):
            break
        lo = max(0, int(n * 0.9) - 1)
        rate = (n - 1 - lo) / (times[n - 1] - times[lo]) if n - 1 > lo else float("nan")
        out.append({"generated": n, "throughput_tok_s": n / (times[n - 1] - start), "decode_rate_tok_s": rate})
    return out


def run(settings, machine: dict, log) -> list[dict]:
    prompt_len, lengths = settings.prompt_len, settings.lengths
    rows = []
    torch.manual_seed(0)
    for name in settings.sample_models:
        config = get_preset(name)
        prompt = torch.randint(0, config.vocab_size, (prompt_len,)).tolist()
        ours = build_model(config).eval()
        candidates = [("kitelm", ours, _arrivals_ours, max(lengths))]
        peer = peer_for(config) if settings.peers else None
        if peer is not None:  # HF's growing caches make very long runs take hours: capped at peer_max_len
            candidates.append((peer[0], peer[1], hf_token_arrivals, min(max(lengths), settings.peer_max_len)))
        for impl, model, arrivals, n in candidates:
            arrivals(model, prompt[:16], 4)  # warm-up: compiles/loads kernels and allocator pools before timing
            start, times = arrivals(model, prompt, n)
            for point in _summarise(start, times, lengths):
                rows.append({"model": name, "impl": impl, "prompt": prompt_len, **point})
                log(f"sample {name:<18} {impl:<28} {point['generated']:>6} tokens: "
                    f"{point['throughput_tok_s']:7.1f} tok/s (decode {point['decode_rate_tok_s']:7.1f} tok/s)")
    return rows


def plot(rows: list[dict], settings, out) -> None:
    model_lines(rows, "generated", "throughput_tok_s", out / "sample_throughput.png",
                f"Sampling throughput after a {settings.prompt_len}-token prompt (batch 1)", "tokens / s")

