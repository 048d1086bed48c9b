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


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] → next token ids [B]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep tokens until the mass before them reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


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
