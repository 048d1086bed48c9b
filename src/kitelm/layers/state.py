"""The base of every layer's inference state (`KVCache`, `RingKVCache`, `RecurrentState`).

A state is a module whose tensors are registered buffers, so `.to()`, `state_dict()` and `nbytes()` work on any of
them. Every buffer is batch-first, `[B, ...]`: row b of each buffer belongs to sequence b, so a sequence's state is
`{name: buf[b] for name, buf in state.named_buffers()}` and rows can be gathered or scattered with index_select /
index_copy_ on dim 0. Plain-int attributes (a KV cache's `length`, a ring's `count`) are shared by all rows.
"""

from __future__ import annotations

from torch import nn


class LayerState(nn.Module):
    """Buffers `[B, ...]` (batch first); `nbytes()` is their total size."""

    def nbytes(self) -> int:
        """Bytes held by the state's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())
