"""Local (sliding-window) multi-query attention of Griffin, with GDM's window semantics and a ring-buffer cache.

    q = RoPE(x W_q), k = RoPE(x W_k), v = x W_v         RoPE on the first half of each head (GDM torch/modules.py:53-85)
    y = softmax(q kᵀ / √hd + M) v W_final + b_final     one K/V head (MQA); W_final has a bias
    M[q, k] = 0  iff  same document ∧ k ≤ q ≤ k + window, else −∞

The window is inclusive (GDM torch/modules.py:119-121): a query sees itself and the `window` tokens before it, i.e.
window + 1 keys (transformers sees only window keys). Window distances count tokens (array indices, pads included);
documents are `cumsum(segment_pos == 0)` (GDM torch/modules.py:129-150), so packed documents and left pads never mix.

The full-sequence forward is blocked: queries in blocks of `block` tokens each see at most window + block keys, so
memory grows as T × window, never T × T. The same code continues a `RingKVCache` with a chunk of any length.
`local_attend` holds this mask and ring machinery; the shaped, value-free variant (`shaped_attention.py`,
`LocalShapedAttention`) reuses it with its own attention matrix.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode import decode_isa, row_kernels
from .linear import Linear
from .rope import RotaryEmbedding
from .state import LayerState


class RingKVCache(LayerState):
    """The last `window` keys/values of one local-attention layer: `k, v [B, H_kv, window, hd]`; the token seen at
    step τ (counting every token, pads included) lives in slot τ mod window. `segment [B, window]` is each slot's
    document id (−1 = empty), `last_segment [B]` the id of the latest token, `count` the number of tokens seen.
    Its size does not depend on `count`. `value_heads` (default `kv_heads`) sets the heads of `v`: the shaped
    attention stores its values, the normalised inputs split into all n_heads heads, as `v [B, n_heads, window, hd]`.
    Buffers are batch-first (`layers/state.py`); `count` is shared by all rows.

    GDM's ring (torch/modules.py:187-223, :256-286) counts each row's real tokens (`segment_pos[-1] + 1`) and cannot
    take chunks; counting every step and storing document ids instead makes any chunk continue the state exactly."""

    def __init__(self, batch: int, kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None, value_heads: int | None = None):
        super().__init__()
        value_heads = kv_heads if value_heads is None else value_heads
        self.register_buffer("k", torch.zeros(batch, kv_heads, window, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, value_heads, window, head_dim, dtype=dtype, device=device))
        self.register_buffer("segment", torch.full((batch, window), -1, dtype=torch.long, device=device))
        self.register_buffer("last_segment", torch.zeros(batch, dtype=torch.long, device=device))
        self.count = 0

    @property
    def window(self) -> int:
        return self.k.shape[2]

    def slot_steps(self) -> torch.Tensor:
        """[window]: the step of the token held by each slot (the latest τ < count with τ ≡ slot mod window)."""
        slots = torch.arange(self.window, device=self.k.device)
        return self.count - 1 - (self.count - 1 - slots) % self.window

    def write(self, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor) -> None:
        """Append `k, v [B, H_kv, T, hd]` and `segment [B, T]`; only the last `window` tokens are kept."""
        t = k.shape[2]
        m = min(t, self.window)
        first = (self.count + t - m) % self.window
        if first + m <= self.window:  # no wrap-around (always for one token): a slice, no index tensor
            slots = slice(first, first + m)
        else:
            slots = (first + torch.arange(m, device=k.device)) % self.window
        self.k[:, :, slots] = k[:, :, t - m:].to(self.k.dtype)
        self.v[:, :, slots] = v[:, :, t - m:].to(self.v.dtype)
        self.segment[:, slots] = segment[:, t - m:]
        self.last_segment.copy_(segment[:, -1])
        self.count += t


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def is_causal_mask(mask: torch.Tensor) -> bool:
    """Whether mask [B, 1, Tq, S] is the lower-triangular causal mask (Tq = S) in every row."""
    tq, keys = mask.shape[-2:]
    if tq != keys or tq < 2:
        return False
    causal = torch.ones(tq, keys, dtype=torch.bool, device=mask.device).tril_()
    return torch.equal(mask, causal.expand_as(mask))


def local_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_pos: torch.Tensor,
                 cache: RingKVCache | None, window: int, block: int, attend: Attend) -> torch.Tensor:
    """Blocked sliding-window attention: q [B, H, T, hd], k [B, H_k, T, hd], v [B, H_v, T, hd_v], segment_pos [B, T]
    → [B, H, T, hd_v], continuing and then updating `cache` (its keys/values are prepended where in the window).

    For each block of at most `block` queries and its S ≤ window + block keys, `attend(q_blk, k_blk, v_blk, mask,
    identity)` mixes the values: mask [B, 1, Tq, S] is M (True = same document ∧ k ≤ q ≤ k + window), identity
    [B, 1, Tq, S] is True where the key is the query's own token (the I of shaped attention). Every query sees itself,
    so no row of the mask is empty. One query with a cache (decoding) takes `attend_one`."""
    b, t = segment_pos.shape
    if cache is not None and t == 1:
        return attend_one(q, k, v, segment_pos, cache, attend)
    segment = torch.cumsum(segment_pos == 0, dim=1)  # document ids (GDM torch/modules.py:143)
    start = 0
    if cache is not None:
        start, segment = cache.count, segment + cache.last_segment[:, None]
    steps = start + torch.arange(t, device=q.device)  # token counts: the window is measured in these
    outs = []
    for s in range(0, t, block):
        e = min(s + block, t)
        lo = max(0, s - window)
        ks, vs, k_seg, k_step = k[:, :, lo:e], v[:, :, lo:e], segment[:, lo:e], steps[lo:e].expand(b, -1)
        if cache is not None and cache.count > 0 and s < window:  # the ring holds keys in the window
            ks, vs = torch.cat([cache.k.to(k.dtype), ks], 2), torch.cat([cache.v.to(v.dtype), vs], 2)
            k_seg = torch.cat([cache.segment, k_seg], 1)
            k_step = torch.cat([cache.slot_steps().expand(b, -1), k_step], 1)
        q_step, q_seg = steps[s:e][None, :, None], segment[:, s:e, None]
        k_step, k_seg = k_step[:, None, :], k_seg[:, None, :]
        mask = (q_seg == k_seg) & (k_step <= q_step) & (q_step <= k_step + window)  # [B, Tq, S]
        outs.append(attend(q[:, :, s:e], ks, vs, mask[:, None], (k_step == q_step)[:, None]))
    if cache is not None:
        cache.write(k, v, segment)
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_pos: torch.Tensor, cache: RingKVCache,
               attend: Attend) -> torch.Tensor:
    """`local_attend` for one token per row (T = 1), the decoding step: the ring holds exactly the `window` tokens
    before the query, all within its window, so the keys are the ring's slots plus the query's own, and the mask is
    only "same document" (empty slots have document −1). No block loop, no step arithmetic."""
    segment = cache.last_segment + (segment_pos[:, 0] == 0)  # [B] document id of the new token
    keys, values = torch.cat([cache.k.to(k.dtype), k], 2), torch.cat([cache.v.to(v.dtype), v], 2)
    own = torch.ones_like(segment_pos, dtype=torch.bool)  # [B, 1]
    mask = torch.cat([cache.segment == segment[:, None], own], 1)[:, None, None]  # [B, 1, 1, window + 1]
    identity = torch.cat([torch.zeros_like(cache.segment[:1], dtype=torch.bool), own[:1]], 1)  # [1, window + 1]
    y = attend(q, keys, values, mask, identity)
    cache.write(k, v, segment[:, None])
    return y


def softmax_attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_pos: torch.Tensor,
                       cache: RingKVCache) -> torch.Tensor:
    """`attend_one` for softmax attention, q [B, H, 1, hd], k, v [B, H_kv, 1, hd] → [B, H, 1, hd] (cache updated):

        s_j = q·K_j / √hd over the ring's W slots (−∞ where another document or empty),  s_own = q·k / √hd
        y   = Σ_j p_j V_j + p_own v,   p = softmax([s, s_own])

    The ring's scores and the own key's are computed apart and normalised together, so the ring is never
    concatenated with the new token (2·W·hd values copied per step) and each K/V head serves its G = H / H_kv query
    heads as one [G, hd] × [hd, W] product instead of being repeated per head (SDPA's `enable_gqa` on CPU): at
    RecurrentGemma-2B's sizes (W = 2,048, hd = 256, 10 heads, 1 K/V head) 0.44 ms instead of 1.3-1.6 ms a layer
    (benchmarks/NOTES.md, "Decode step"). Until the ring has wrapped only its first `count` slots hold tokens, so
    only those are scored (the others would get p = 0). The products round the scores to the input dtype, so
    `LocalAttention` takes this path for float32/float64 only."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    segment = cache.last_segment + (segment_pos[:, 0] == 0)  # [B] document id of the new token
    qg = q.reshape(b, kv_heads, h // kv_heads, d) * d ** -0.5  # [B, H_kv, G, hd]: the heads sharing a K/V head
    used = min(cache.count, cache.window)  # slots τ mod W of the tokens τ < count seen so far
    kernels = row_kernels(q) if cache.k.dtype == q.dtype else None
    if kernels is not None:  # the same sums in one C++ call (ops/decode.py): at W = 2,048, 0.34 → 0.10 ms a layer
        y = kernels.attend_ring(qg, k, v, cache.k, cache.v, cache.segment, segment, used, decode_isa())
    else:
        y = _ring_softmax(qg, k, v, cache, segment, used)
    cache.write(k, v, segment[:, None])
    return y.reshape(b, h, 1, d)


def _ring_softmax(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: RingKVCache, segment: torch.Tensor,
                  used: int) -> torch.Tensor:
    """`softmax_attend_one`'s sums in torch ops (the twin of the `attend_ring` kernel): qg [B, H_kv, G, hd] → y."""
    ring_k, ring_v = cache.k[:, :, :used].to(qg.dtype), cache.v[:, :, :used].to(qg.dtype)
    other = (cache.segment[:, :used] != segment[:, None])[:, None, None]  # [B, 1, 1, used]
    scores = torch.cat([torch.matmul(qg, ring_k.transpose(-1, -2)).masked_fill(other, float("-inf")),
                        (qg * k).sum(-1, keepdim=True)], -1)  # [B, H_kv, G, W + 1]
    p = torch.softmax(scores, -1)
    return torch.matmul(p[..., :-1], ring_v) + p[..., -1:] * v  # [B, H_kv, G, hd]


class LocalAttention(nn.Module):
    """x [B, T, D], segment_pos [B, T] (0 = document start, −1 = pad), cache → [B, T, D]."""

    def __init__(self, width: int, n_heads: int, kv_heads: int, head_dim: int, window: int,
                 rope_base: float = 10_000.0, rope_fraction: float = 0.5, final_var_scale: float = 1.0):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim, self.window = n_heads, kv_heads, head_dim, window
        self.block = max(window, 64)  # query block length of the blocked forward
        self.proj_q = Linear(width, n_heads * head_dim, bias=False)
        self.proj_k = Linear(width, kv_heads * head_dim, bias=False)
        self.proj_v = Linear(width, kv_heads * head_dim, bias=False)
        self.proj_final = Linear(n_heads * head_dim, width, bias=True)
        self.rope = RotaryEmbedding(head_dim, rope_base, rope_fraction)
        self.final_var_scale = final_var_scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GDM torch/modules.py LocalAttentionBlock: q, k, v ~ N(0, 1/D); final ~ N(0, (2/layers)/D), bias 0."""
        for proj in (self.proj_q, self.proj_k, self.proj_v):
            nn.init.normal_(proj.weight, std=math.sqrt(1.0 / proj.in_features))
        nn.init.normal_(self.proj_final.weight, std=math.sqrt(self.final_var_scale / self.proj_final.in_features))
        nn.init.zeros_(self.proj_final.bias)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> RingKVCache:
        """An empty ring of `window` slots (`max_len` is ignored: the state is bounded)."""
        return RingKVCache(batch, self.kv_heads, self.window, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, segment_pos: torch.Tensor, cache: RingKVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.proj_q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.proj_k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope.pair(q, k, segment_pos)
        v = self.proj_v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and t == 1 and q.dtype in (torch.float32, torch.float64):
            y = softmax_attend_one(q, k, v, segment_pos, cache)
        else:
            y = local_attend(q, k, v, segment_pos, cache, self.window, self.block, self._attend)
        return self.proj_final(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                identity: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ/√hd + M) v; SDPA's −inf acts as GDM's −2.38e38 fill (torch/modules.py:28). A mask that is
        exactly causal (a prefill of one document per row within the window, no cache before it) goes to SDPA as
        `is_causal`, which skips the masked half instead of reading the mask: the same result bit for bit, 151 →
        92 ms a layer for RecurrentGemma-2B's 2,048-token prefill (benchmarks/NOTES.md, "Prefill epilogues")."""
        gqa = self.kv_heads != self.n_heads
        if is_causal_mask(mask):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
