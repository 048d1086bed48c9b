"""Griffin, Hawk and RecurrentGemma (De et al. 2024, arXiv 2402.19427; Botev et al. 2024, arXiv 2404.07839).

    x ← E[tokens] (· bf16(√D) for RecurrentGemma)
    per layer i:  x ← x + Temporal_i(RMSNorm(x));  x ← x + MLP(RMSNorm(x))
    logits = softcap(RMSNorm(x) Eᵀ)

Deltas from the baseline transformer (`transformer.py`):
- the temporal block cycles through `block_pattern`: R = recurrent block, A = local MQA (`layers/local_attention.py`);
  Hawk is "R" only. With `attention_kind="shaped"` (Griffin-SAS) A is instead the local shaped
  attention of He & Hofmann 2023 (`layers/shaped_attention.py` LocalShapedAttention): α·I + β·softmax(QKᵀ/√d + M) − γ·C
  over the window, identity values and no output projection, so the block is the identity of its input at init.
  Recurrent block (`layers/recurrent.py`, GDM torch/modules.py:496-680):
      y = gelu_tanh(W_y x + b_y);  u = RG-LRU(Conv1D(W_x x + b_x));  out = W_out(u ⊙ y) + b_out
- RMSNorm with gain (1 + scale), scale initialised to 0, in the input dtype (GDM torch/layers.py:30-73);
- GeGLU MLP with biases, hidden 3·D (GDM torch/modules.py:683-752: gate = branch 0, value = branch 1);
- the input embedding scale √D is rounded to bfloat16 (√2560 → 50.5; GDM torch/modules.py:994-998);
- a bounded inference state per layer: Conv1D state + float32 RG-LRU state, or a ring KV cache of `window` slots.

Init follows GDM (torch/griffin.py:70): output projections use variance scale 2/layers over their fan-in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.local_attention import LocalAttention
from ..layers.mlp import MLP
from ..layers.norms import RMSNorm
from ..layers.recurrent import RecurrentBlock
from ..layers.rope import default_positions
from ..layers.shaped_attention import LocalShapedAttention
from .base import LanguageModel

BLOCK_KINDS = {"R": "recurrent", "A": "attention"}
ATTENTION_KINDS = ("mqa", "shaped")


class ResidualBlock(nn.Module):
    """r = x + Temporal(RMSNorm(x));  out = r + MLP(RMSNorm(r))   (GDM torch/modules.py:877-911)."""

    def __init__(self, config, kind: str):
        super().__init__()
        c = config
        final_var_scale = 2.0 / c.n_layers  # GDM torch/griffin.py:70 final_w_init_variance_scale
        self.kind = kind
        self.temporal_pre_norm = RMSNorm(c.width, c.norm_eps, unit_offset=True)
        if kind == "recurrent":
            self.temporal_block = RecurrentBlock(c.width, c.recurrent_width, c.n_heads, c.conv_width,
                                                 final_var_scale)
        elif c.attention_kind == "shaped":
            self.temporal_block = LocalShapedAttention(c.width, c.n_heads, c.kv_heads, c.dim_per_head,
                                                       c.attention_window, c.rope_base, c.rope_fraction)
        else:
            self.temporal_block = LocalAttention(c.width, c.n_heads, c.kv_heads, c.dim_per_head, c.attention_window,
                                                 c.rope_base, c.rope_fraction, final_var_scale)
        self.channel_pre_norm = RMSNorm(c.width, c.norm_eps, unit_offset=True)
        self.mlp = MLP(c.width, c.mlp_width, c.mlp, bias=True)
        for lin, scale in ((self.mlp.gate, 1.0), (self.mlp.up, 1.0), (self.mlp.down, final_var_scale)):
            nn.init.normal_(lin.weight, std=math.sqrt(scale / lin.in_features))
            nn.init.zeros_(lin.bias)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str | None = None):
        """The temporal block's bounded state (`max_len` is ignored)."""
        return self.temporal_block.new_state(batch, max_len, dtype, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, state) -> torch.Tensor:
        if positions is None:
            positions = default_positions(x.shape[0], x.shape[1], x.device)
        r = x + self.temporal_block(self.temporal_pre_norm(x), positions, state)
        return r + self.mlp(self.channel_pre_norm(r))


class Griffin(LanguageModel):
    """Griffin / Hawk / RecurrentGemma language model: input_ids [B, T] (+ positions [B, T], 0 = document start,
    −1 = pad) → float32 logits [B, T, vocab]."""

    def __init__(self, config):
        super().__init__(config)
        kinds = self.block_kinds(config)
        self.blocks = nn.ModuleList(ResidualBlock(config, kind) for kind in kinds)
        self.norm = RMSNorm(config.width, config.norm_eps, unit_offset=True)
        nn.init.normal_(self.embed.weight, std=math.sqrt(1.0 / config.width))  # GDM Embedder: variance 1/D
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=math.sqrt(1.0 / config.width))
        # bf16(√D), applied to the input embedding only (GDM torch/modules.py:994-998): √2560 = 50.596 → 50.5
        self.embed_scale = float(torch.tensor(math.sqrt(config.width), device="cpu").to(torch.bfloat16))

    @staticmethod
    def block_kinds(config) -> list[str]:
        pattern = config.block_pattern
        return [BLOCK_KINDS[pattern[i % len(pattern)]] for i in range(config.n_layers)]

    @staticmethod
    def validate_config(config, need) -> None:
        need(bool(config.block_pattern) and set(config.block_pattern) <= set(BLOCK_KINDS),
             f"block_pattern={config.block_pattern!r} must be a non-empty string of R (recurrent) and A (attention)")
        lru = config.recurrent_width
        need(isinstance(lru, int) and lru > 0, f"lru_width={config.lru_width!r} must be a positive integer")
        need(lru % config.n_heads == 0,
             f"n_heads={config.n_heads} (the RG-LRU gate blocks) does not divide lru_width={lru}")
        need(config.mlp in ("geglu", "swiglu"), f"mlp={config.mlp!r}: Griffin uses a gated MLP (geglu)")
        need(isinstance(config.conv_width, int) and config.conv_width >= 2,
             f"conv_width={config.conv_width!r} must be an integer >= 2 (the Conv1D state keeps the last "
             "conv_width - 1 inputs)")
        need(isinstance(config.attention_window, int) and config.attention_window >= 1,
             f"attention_window={config.attention_window!r} must be a positive integer")
        need(config.attention_kind in ATTENTION_KINDS,
             f"attention_kind={config.attention_kind!r} is unknown; choose one of {list(ATTENTION_KINDS)}")
        need(config.attention_kind != "shaped" or config.n_heads * config.dim_per_head == config.width,
             f"attention_kind='shaped' uses the input as values: n_heads·head_dim = {config.n_heads}·"
             f"{config.dim_per_head} must equal width={config.width}")

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(input_ids)
        return x * self.embed_scale if self.config.embed_scale_sqrt else x

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Scores and weighted sum over at most window + 1 keys per query, ×3 for the backward pass."""
        c = self.config
        n_attn = sum(kind == "attention" for kind in self.block_kinds(c))
        keys = min(seq_len / 2, c.attention_window + 1)
        return 6 * 2 * n_attn * c.n_heads * c.dim_per_head * keys
