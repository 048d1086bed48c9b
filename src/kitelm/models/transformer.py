"""The baseline transformer: pre-norm residual blocks of causal self-attention and MLP.

    x ← x + Attn(RMSNorm(x));  x ← x + MLP(RMSNorm(x))

Deltas from GPT-2: RMSNorm instead of LayerNorm, RoPE instead of learned positions, no biases, gated MLP (GeGLU) by
default, grouped-query attention through `n_kv_heads`, tied embeddings. This is the Llama/Gemma recipe.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import Attention, KVCache
from ..layers.mlp import MLP
from ..layers.norms import RMSNorm
from ..layers.rope import RotaryEmbedding
from .base import LanguageModel, init_linear_, residual_std


class TransformerBlock(nn.Module):
    def __init__(self, config, rope: RotaryEmbedding):
        super().__init__()
        self.attn_norm = RMSNorm(config.width, config.norm_eps)
        self.attn = Attention(config.width, config.n_heads, config.kv_heads, config.dim_per_head, rope)
        self.mlp_norm = RMSNorm(config.width, config.norm_eps)
        self.mlp = MLP(config.width, config.mlp_width, config.mlp)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> KVCache:
        return self.attn.new_state(batch, max_len, dtype, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(LanguageModel):
    def __init__(self, config):
        super().__init__(config)
        rope = RotaryEmbedding(config.dim_per_head, config.rope_base, config.rope_fraction)
        self.blocks = nn.ModuleList(TransformerBlock(config, rope) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.width, config.norm_eps)
        init_linear_(self, config.init_std, residual_std(config))
