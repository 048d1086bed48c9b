"""Causal self-attention with multi-head, grouped-query and multi-query variants (through `n_kv_heads`), RoPE and
`scaled_dot_product_attention`. With a `KVCache` (its inference state, defined here) it decodes incrementally; with
padded `positions` (−1) it masks pads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KitelmError
from .linear import Linear
from .rope import RotaryEmbedding, default_positions
from .state import LayerState


class KVCache(LayerState):
    """Keys and values of one attention layer: `k, v [B, H_kv, capacity, hd]`, `pos [B, capacity]` (−1 = empty/pad).

    Preallocated to a capacity, written in place, never concatenated. Slots are filled left to right; `length` counts
    the filled slots (shared by all rows: left padding is recorded as position −1). Buffers are batch-first
    (`layers/state.py`).
    """

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device))
        self.register_buffer("pos", torch.full((batch, capacity), -1, dtype=torch.long, device=device))
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write `k, v [B, H_kv, T, hd]` at the next T slots; return all filled keys, values and their positions."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise KitelmError(f"KV cache full: {end} tokens exceed its capacity of {self.capacity}; "
                              "allocate the cache with a larger capacity (max_len)")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.pos[:, self.length:end] = positions
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:, :end]


def causal_mask(k_pos: torch.Tensor, q_slot: torch.Tensor, k_slot: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk]: a query sees real keys (pos ≥ 0) stored at or before its own slot.
    A query always sees its own slot, so padded queries never get an empty row."""
    allowed = (k_slot[None, :] <= q_slot[:, None]).unsqueeze(0) & (k_pos >= 0).unsqueeze(1)
    allowed = allowed | (k_slot[None, :] == q_slot[:, None]).unsqueeze(0)
    return allowed.unsqueeze(1)


def cached_keys_and_mask(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache: KVCache | None):
    """Append the T new `k, v [B, H_kv, T, hd]` to `cache` (if any). Returns all keys and values, the slot-causal
    mask [B, 1, T, S] and the own-slot matrix [T, S] (True where a key is the query's own token)."""
    if cache is not None and k.shape[2] == 1:  # decoding: the query sits in the last slot and sees every real key
        k, v, k_pos = cache.append(k, v, positions)
        identity = torch.arange(k.shape[2], device=k.device) == k.shape[2] - 1
        return k, v, ((k_pos >= 0) | identity)[:, None, None], identity[None]
    start = cache.length if cache is not None else 0
    q_slot = torch.arange(start, start + k.shape[2], device=k.device)
    k_pos = positions
    if cache is not None:
        k, v, k_pos = cache.append(k, v, positions)
    k_slot = torch.arange(k.shape[2], device=k.device)
    return k, v, causal_mask(k_pos, q_slot, k_slot), k_slot[None, :] == q_slot[:, None]


class Attention(nn.Module):
    """x [B, T, D] → [B, T, D].  softmax(q kᵀ/√hd + M) v with q, k rotated by RoPE; K/V shared by groups of heads."""

    def __init__(self, width: int, n_heads: int, kv_heads: int, head_dim: int, rope: RotaryEmbedding,
                 bias: bool = False):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = n_heads, kv_heads, head_dim
        self.q = Linear(width, n_heads * head_dim, bias=bias)
        self.k = Linear(width, kv_heads * head_dim, bias=bias)
        self.v = Linear(width, kv_heads * head_dim, bias=bias)
        self.out = Linear(n_heads * head_dim, width, bias=bias)
        self.rope = rope

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens."""
        return KVCache(batch, self.kv_heads, max_len, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        plain = positions is None
        if plain:
            positions = default_positions(b, t, x.device)
        q, k = self.rope.pair(q, k, positions)
        if cache is None and plain:  # training fast path: no padding, standard causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.n_heads)
        else:
            k, v, mask, _ = cached_keys_and_mask(k, v, positions, cache)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.n_heads)
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
