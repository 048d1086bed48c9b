"""What every kitelm language model shares: token embedding → blocks → final norm → (tied) head, parameter
accounting, weight-decay groups, and the inference-cache protocol used by `kitelm.generate`.

Subclasses build `self.blocks`: each block has `forward(x, positions, state) -> x` and `new_state(batch, max_len,
dtype, device)`, the inference state of its temporal layer (`layers/`); `new_cache` collects them into a `ModelCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..layers.linear import Linear
from ..ops.decode import linear
from ..ops.prefill import soft_cap


@dataclass
class ModelCache:
    """A model's inference state: `layers[i]`, block i's state (a `layers.state.LayerState`, batch-first buffers),
    and `next_pos [B]`, the position of each row's next token."""

    layers: list
    next_pos: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (the inference state's size)."""
        return sum(layer.nbytes() for layer in self.layers)


class LanguageModel(nn.Module):
    """input_ids [B, T] (+ positions [B, T], −1 = padding) → logits [B, T, vocab] (float32; `logits_to_keep=k`:
    only the last k positions)."""

    config: "object"
    blocks: nn.ModuleList

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.head = None if config.tie_embeddings else Linear(config.width, config.vocab_size, bias=False)

    # ------------------------------------------------------------------ hooks for subclasses
    @staticmethod
    def validate_config(config, need: Callable[[bool, str], None]) -> None:
        """Architecture-specific checks; call `need(condition, message)` for each."""

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Token ids [B, T] (and their positions, for models with a position table) → [B, T, D]."""
        return self.embed(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: ModelCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids [B, T] → float32 logits [B, T, V], or with `logits_to_keep = k ≥ 1` only the last min(k, T)
        positions' logits [B, min(k, T), V] (the same values as those columns of the full output: every block still
        runs on all T tokens and fills `cache`; only the final norm and the output head skip the other positions).
        Prefill and decoding need just the last position (`logits_to_keep=1`: for RecurrentGemma-2B that drops the
        256k-wide head, ~24 % of the forward FLOPs, and a [B, T, 256000] fp32 tensor); evaluation and training keep
        the default 0 = every position. The name and meaning follow transformers' `logits_to_keep` (an int)."""
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep} must be >= 0 (0 = every position)")
        if cache is not None and positions is None:
            positions = cache.next_pos[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids, positions)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, cache.layers[i] if cache is not None else None)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # norms and head act per position
        logits = self.logits(self.final_norm(x))
        if cache is not None:
            cache.next_pos = positions[:, -1] + 1
        return logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.head is None else self.head.weight
        logits = linear(x, weight).float()
        cap = self.config.logit_softcap
        return soft_cap(logits, cap) if cap > 0 else logits  # in place on the fresh product where it can

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> ModelCache:
        """An empty inference cache for `batch_size` rows and up to `max_len` tokens (ignored by bounded states)."""
        ref = next(self.parameters())
        dtype, device = dtype or ref.dtype, torch.device(device) if device else ref.device
        capacity = max_len or self.config.max_seq_len
        layers = [block.new_state(batch_size, capacity, dtype, device) for block in self.blocks]
        return ModelCache(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding=True` leaves out the token embedding (and an untied output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() + (self.head.weight.numel() if self.head is not None else 0)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward ≈ 6·N matmul FLOPs plus attention scores), PaLM appendix B."""
        n = self.num_params(non_embedding=True) + self.config.vocab_size * self.config.width  # the head is a matmul
        return 6 * n + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Global causal attention in every layer (Griffin overrides it): scores and weighted sum, 2 matmuls ·
        2 FLOPs · (causal average seq_len/2) · heads · hd, ×3 for the backward pass."""
        c = self.config
        return 6 * 2 * c.n_layers * c.n_heads * c.dim_per_head * seq_len / 2

    def weight_decay_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decay; vectors and scalars (norm gains, biases, block gains) do not.
        A parameter can opt out explicitly with the attribute `no_weight_decay = True`."""
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or getattr(p, "no_weight_decay", False) else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_linear_(module: nn.Module, std: float, out_std: float) -> None:
    """Normal(0, std) for every Linear and Embedding; `out_std` for layers named `out` or `down` (residual
    projections, scaled by 1/√(2·layers) as in GPT-2); zero biases."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            last = name.rsplit(".", 1)[-1]
            nn.init.normal_(m.weight, std=out_std if last in ("out", "down") else std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def residual_std(config) -> float:
    return config.init_std / math.sqrt(2 * config.n_layers)
