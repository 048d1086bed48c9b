"""Inference caches. A model's cache is a `ModelCache`: one state object per layer plus each row's next position.

`KVCache` is the growing key/value cache of global attention: preallocated to a capacity, written in place, never
concatenated. Bounded-state caches (Griffin's ring buffer and recurrent state) live beside their layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import KitelmError


class KVCache(nn.Module):
    """Keys and values of one attention layer: `k, v [B, H_kv, capacity, hd]`, `pos [B, capacity]` (−1 = empty/pad).

    Slots are filled left to right; `length` counts the filled slots (shared by all rows: left padding is recorded as
    position −1). A buffer-registered module so `.to()` and `nbytes` work like any state.
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

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.k, self.v, self.pos))


@dataclass
class ModelCache:
    """Per-layer states (`layers[i]` belongs to block i) and `next_pos [B]`, the position of each row's next token."""

    layers: list
    next_pos: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (the inference state's size)."""
        return sum(layer.nbytes() for layer in self.layers if layer is not None)
