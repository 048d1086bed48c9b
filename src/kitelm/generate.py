"""The sampling engine. It knows nothing about text: prompts are lists of token ids, output is token ids.

Prompts of different lengths are left-padded; pads get position −1 (masked by attention, a reset for recurrences),
the first real token position 0 — the convention of the official RecurrentGemma sampler. The padded prompt is
prefilled in parallel passes of at most PREFILL_CHUNK tokens (each continues the cache, so peak activation memory is
bounded by the chunk, not the prompt), then tokens are decoded one at a time with the model's cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import KitelmError
from .resources import check_fits

PREFILL_CHUNK = 2048  # tokens per prefill pass: long enough to keep the GEMMs efficient, short enough to bound memory


@dataclass
class Sampling:
    """temperature 0 = greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set with mass ≥ p."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise KitelmError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise KitelmError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise KitelmError(f"top_p={self.top_p} must be in (0, 1]")


NUCLEUS_WINDOW = 256  # top-p looks for its nucleus among this many of the likeliest tokens first
NUCLEUS_BISECTIONS = 32  # then bisects for its probability threshold, to max(p)·2⁻³²


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] → next token ids [B]: p ∝ softmax(logits / temperature) over the tokens top-k and top-p keep.

    Nothing sorts or draws over the whole vocabulary where it need not: top-p finds its nucleus among the likeliest
    tokens (`_nucleus`) and a draw is one uniform a row against the cumulative weights (`draw`). Over
    RecurrentGemma's 256,000 tokens torch's multinomial takes 3.7 ms and a full sort 18 ms on the AVX-512 Zen5,
    against 30-45 ms for a whole int4 RG-2B decoding step (benchmarks/NOTES.md, "The Python beside the kernels",
    Sampling)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th best stay
    probs = logits.softmax(-1)
    if sampling.top_p is not None and sampling.top_p < 1:
        kept, ids = _nucleus(probs, sampling.top_p)
        picks = draw(kept, generator)
        return picks if ids is None else ids.gather(-1, picks[:, None]).squeeze(-1)
    return draw(probs, generator)


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top-p nucleus of probs [B, V]: the likeliest tokens, in order, until the mass before a token reaches p, as
    (weights [B, m], their token ids [B, m]) with weight 0 past the cut, or (weights [B, V], None) over the whole
    vocabulary. Sorting all V (18 ms at 256,000 tokens) is never needed:
    * if the NUCLEUS_WINDOW likeliest (`topk`, sorted: 0.28 ms; all of a smaller vocabulary) hold mass ≥ p in every
      row, every token past them has at least that mass before it, and the cut lies among them;
    * else the nucleus is {i : p_i ≥ τ} for the largest τ with Σ_{p_j ≥ τ} p_j ≥ p, found by bisection on [0, max p]
      (5.4 ms for a flat distribution over 256,000 tokens); it differs from a sort's only where two probabilities at
      the cut are closer than max p · 2⁻³², whose order a sort leaves to chance anyway."""
    top, ids = probs.topk(min(NUCLEUS_WINDOW, probs.shape[-1]), dim=-1)
    mass = top.cumsum(-1)
    if bool((mass[:, -1] >= top_p).all()):
        return top.masked_fill(mass - top >= top_p, 0.0), ids
    low, high = torch.zeros_like(probs[:, :1]), probs.amax(-1, keepdim=True)  # kept: Σ_{p_j ≥ low} p_j ≥ p
    for _ in range(NUCLEUS_BISECTIONS):
        mid = (low + high) / 2
        enough = probs.where(probs >= mid, 0.0).sum(-1, keepdim=True) >= top_p
        low, high = torch.where(enough, mid, low), torch.where(enough, high, mid)
    return probs.masked_fill(probs < low, 0.0), None


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index a row of weights [B, n] (≥ 0, a positive sum): i with probability w_i / Σ w. Inverse CDF: one uniform
    u ∈ (0, 1] a row, the first i whose cumulative weight reaches u · Σ w (CPU cumsums accumulate float32 in float64),
    so an entry of weight 0 is never drawn."""
    cumulative = weights.cumsum(-1)
    total = cumulative[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise KitelmError("sampling: the logits are not finite (NaN or inf in the model's output); check the "
                          "checkpoint, or sample greedily (temperature 0)")
    u = 1 - torch.rand(total.shape, generator=generator, dtype=cumulative.dtype, device=cumulative.device)
    return torch.searchsorted(cumulative, u * total).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """→ tokens [B, P] and positions [B, P] (−1 on pads, 0 on each prompt's first token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise KitelmError("every prompt needs at least one token; give a non-empty prompt")
    longest = max(map(len, prompts))
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    positions = (torch.arange(longest, device=device)[None, :] - longest + lengths[:, None]).clamp(min=-1)
    return tokens, positions


def cache_bytes(model, batch: int, capacity: int) -> int:
    """Bytes of `model.new_cache(batch, capacity)`, counted on the meta device (nothing allocated)."""
    return model.new_cache(batch, max_len=capacity, device="meta").nbytes()


@torch.inference_mode()  # cheaper than no_grad per op; the cache never meets autograd
def prefill(model, tokens: torch.Tensor, positions: torch.Tensor, cache, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run tokens [B, T] with positions [B, T] through `model` into `cache`, `chunk` tokens per pass; returns the
    last position's logits [B, V] (equal to one pass over all T up to float rounding). Only that position's logits
    are computed (`logits_to_keep=1`: the output head runs on one row per pass, not on every prompt token)."""
    for start in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, start:start + chunk], positions[:, start:start + chunk], cache, logits_to_keep=1)
    return logits[:, -1]


@torch.inference_mode()
def generate_tokens(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
                    seed: int | None = None, stop_id: int | None = None,
                    prefill_chunk: int = PREFILL_CHUNK) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] for every prompt, one step at a time, until `max_new_tokens` or until every row
    has produced `stop_id` (rows that stopped keep yielding `stop_id`). The prompts are prefilled `prefill_chunk`
    tokens at a time."""
    sampling = sampling or Sampling()
    if max_new_tokens < 0:
        raise KitelmError(f"max_new_tokens={max_new_tokens} must be >= 0")
    device = next(model.parameters()).device
    tokens, positions = left_pad(prompts, device=device)
    vocab = model.config.vocab_size
    outside = (tokens < 0) | (tokens >= vocab)
    if bool(outside.any()):
        raise KitelmError(f"prompt token id {int(tokens[outside][0])} is outside the model's vocabulary [0, {vocab}); "
                          "encode text with the checkpoint's tokenizer")
    capacity = tokens.shape[1] + max_new_tokens
    check_fits(f"the inference cache for {len(prompts)} prompt(s) of up to {capacity:,} tokens",
               cache_bytes(model, len(prompts), capacity), "generate fewer tokens (--max-new-tokens) or use fewer "
               "or shorter prompts")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.eval()
    cache = model.new_cache(len(prompts), max_len=tokens.shape[1] + max_new_tokens)
    logits = prefill(model, tokens, positions, cache, prefill_chunk)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, sampling, generator)
        if stop_id is not None:
            nxt = nxt.masked_fill(done, stop_id)
            done |= nxt == stop_id
        yield nxt
        if stop_id is not None and bool(done.all()):
            return
        logits = model(nxt[:, None], cache=cache)[:, -1]
