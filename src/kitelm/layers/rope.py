"""Rotary position embeddings (Su et al., 2021) in the rotate-half layout, on all or the first part of each head.

For a head vector split as [x_rot (r dims) | x_pass], with x_rot = [x1 | x2] (r/2 each) and
θ_i = pos · base^(-2i/r):  x_rot' = [x1·cos θ − x2·sin θ | x2·cos θ + x1·sin θ]. `x_pass` is unchanged.
Griffin rotates only the first half of each head (r = head_dim / 2).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.decode import MAX_ROWS, row_kernels


def default_positions(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """positions [B, T] = 0..T−1 in every row: one unpadded document per row (a forward without `positions`)."""
    return torch.arange(length, device=device).expand(batch, length)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10_000.0, fraction: float = 1.0):
        super().__init__()
        self.rotated = int(head_dim * fraction)
        self.base = base
        self._inv_freq: torch.Tensor | None = None  # base^(−2i/r) [r/2], float32, on the device last asked for

    def pair(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate queries and keys [B, H, T, hd] at positions [B, T] (negative = padding, treated as 0), computing cos
        and sin once."""
        kernels = row_kernels(q) if positions.numel() <= MAX_ROWS and k.dtype == q.dtype and self.rotated else None
        if kernels is not None:  # float32, ≤ 8 tokens (decoding): one C++ call each (ops/decode.py)
            inv_freq = self.inv_freq(q.device)
            return kernels.rope_rotate(q, positions, inv_freq), kernels.rope_rotate(k, positions, inv_freq)
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] → cos θ, sin θ [B, 1, T, r/2] in `dtype` (angles computed in float32)."""
        angles = positions.clamp(min=0).unsqueeze(-1).to(torch.float32) * self.inv_freq(positions.device)  # [B, T, r/2]
        return angles.cos().unsqueeze(1).to(dtype), angles.sin().unsqueeze(1).to(dtype)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """θ_i / pos = base^(−2i/r) [r/2] in float32, computed once per device (a plain attribute, not a buffer:
        `model.to(dtype)` must not round it), instead of four small ops on every call."""
        if self._inv_freq is None or self._inv_freq.device != device:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, also when first asked for in decoding
                exponents = torch.arange(0, self.rotated, 2, device=device, dtype=torch.float32) / self.rotated
                self._inv_freq = 1.0 / self.base**exponents
        return self._inv_freq

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, hd] with cos, sin from `cos_sin`."""
        x_rot, x_pass = x[..., : self.rotated], x[..., self.rotated:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated
