"""Attention for the simplified transformer blocks (He & Hofmann, ICLR 2024, arXiv 2311.01906).

Per head h, with X_h the head's slice of the values and A_h = softmax(Q_h K_hᵀ/√d_k + M):

    softmax   (Pre-LN, Eq. 2):           Ã_h = A_h
    shaped    (Noci et al.; paper Eq. 5): Ã_h = α_h·I + β_h·A_h − γ_h·C
    skipinit  (Value-SkipInit, Eq. 4):    Ã_h = α_h·I + β_h·A_h

    Attn_h(X) = Ã_h · V_h,   MHA(X) = Concat_h(Attn_h(X)) · W^P

C is the constant centring matrix, "the post-softmax matrix with zero Q-K dot product" (the authors in
bobby-he/simplified_transformers#3): softmax(0 + M), i.e. C_ij = 1/i for j ≤ i (1-indexed) without padding, and the
uniform distribution over each query's visible keys with padding or a KV cache. I is 1 where the key is the query's
own cache slot. Both are added after the softmax, as in the reference code's `_attn`. Every row of Ã sums to
α_h + β_h − γ_h (α_h while β_h = γ_h, as at init).

Values and projections (`values`):
    linear       trainable W^V, W^P, N(0, init_std) (the Pre-LN baseline)
    orthogonal   trainable W^V, W^P initialised random-orthogonal (the reference's Value-SkipInit baseline)
    identity     no W^V and no W^P (SAS, Sec. 4.2): head h mixes its own slice of the input; optionally the first
                 layer keeps W^V = α_V·I + β_V·ΔW (App. C, `ReparamLinear`)

With `shaped`/`skipinit`, W^Q (and its bias) start at 0, so logits are 0, A = C and Ã = α·I at init (β = γ).

`LocalShapedAttention` is the same shaped, value/projection-free attention inside Griffin's block pattern
(`attention_kind="shaped"`, the `griffin-sas-*` presets): Griffin's sliding window and multi-query keys, the mask and
ring-cache machinery of `local_attention.py`, M and C restricted to the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, cached_keys_and_mask
from .linear import Linear
from .local_attention import RingKVCache, local_attend
from .rope import RotaryEmbedding, default_positions

ATTENTION_MATRICES = ("softmax", "shaped", "skipinit")
VALUE_PROJECTIONS = ("linear", "orthogonal", "identity")


def shaped_attention_matrix(logits: torch.Tensor, mask: torch.Tensor, identity: torch.Tensor, alpha: torch.Tensor,
                            beta: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """Ã = α·I + β·softmax(logits + M) − γ·C, all [B, H, Tq, Tk].

    logits [B, H, Tq, Tk] (already scaled by 1/√d_k); mask [B, 1, Tq, Tk] (True = visible); identity [Tq, Tk] or
    [B, 1, Tq, Tk] (True where the key slot is the query's slot); alpha, beta, gamma [H] per-head gains (gamma
    None = no centring).
    C = softmax(0 + M) is the row-uniform distribution over visible keys. The sum is ordered (β·A − γ·C) + α·I so that
    at init (zero logits, β = γ) the result is exactly I in floating point.
    """
    # The reference fills masked logits with finfo.min (not −inf) before the softmax (model_utils.py `_attn`).
    attn = logits.masked_fill(~mask, torch.finfo(logits.dtype).min).softmax(-1)
    shaped = beta.view(1, -1, 1, 1) * attn
    if gamma is not None:
        visible = mask.to(logits.dtype)
        shaped = shaped - gamma.view(1, -1, 1, 1) * (visible / visible.sum(-1, keepdim=True))
    return shaped + alpha.view(1, -1, 1, 1) * identity.to(logits.dtype)


class ReparamLinear(nn.Module):
    """x [..., D] → α·x + β·x ΔWᵀ: W = α·I + β·ΔW (paper Eq. 6 with W_init = I). ΔW [D, D] starts at 0 and is
    weight-decayed; the scalars α, β start at 1 and are not (App. C / D.1, code `first_layer_value_resid_gain: 1`)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, width))
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.ones(1))
        self.alpha.no_weight_decay = self.beta.no_weight_decay = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta * F.linear(x, self.weight)


class ShapedAttention(nn.Module):
    """x [B, T, D] → [B, T, D]: multi-head causal attention with the attention matrix `matrix` (see module docstring)
    and values/projections `values`. RoPE when `rope` is given (else positions come from the model's embedding).
    With a `KVCache` it decodes incrementally; `positions` −1 marks left padding."""

    def __init__(self, width: int, n_heads: int, head_dim: int, rope: RotaryEmbedding | None, matrix: str = "shaped",
                 values: str = "identity", first_layer_value: bool = False, qk_bias: bool = False):
        super().__init__()
        if values == "identity" and n_heads * head_dim != width:
            raise ValueError(f"identity values need n_heads·head_dim = width, got {n_heads}·{head_dim} ≠ {width}")
        self.n_heads, self.head_dim, self.matrix, self.values = n_heads, head_dim, matrix, values
        inner = n_heads * head_dim
        self.q = Linear(width, inner, bias=qk_bias)
        self.k = Linear(width, inner, bias=qk_bias)
        if values == "identity":
            self.v = ReparamLinear(width) if first_layer_value else None
            self.out = None
        else:
            self.v = Linear(width, inner, bias=False)  # the reference's V and P have no bias
            self.out = Linear(inner, width, bias=False)
        self.rope = rope
        if matrix != "softmax":
            # α_h = β_h = 1 (shaped) or α_h = 1, β_h = 0 (skipinit, Eq. 4); γ_h = β_h = 1: paper App. D.1, code
            # `attn_mat_skip_gain: 1`, `attn_mat_resid_gain: 1`, `centre_attn_gain: ${attn_mat_resid_gain}`.
            self.alpha = nn.Parameter(torch.ones(n_heads))
            self.beta = nn.Parameter(torch.ones(n_heads) if matrix == "shaped" else torch.zeros(n_heads))
            self.gamma = nn.Parameter(torch.ones(n_heads)) if matrix == "shaped" else None
            for p in (self.alpha, self.beta, self.gamma):
                if p is not None:
                    p.no_weight_decay = True  # no weight decay on any gain (reference train_utils.py)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (one K/V head per query head)."""
        return KVCache(batch, self.n_heads, max_len, self.head_dim, dtype, device)

    def reset_special_parameters(self) -> None:
        """Initialisations that differ from N(0, init_std); call after the model-wide Linear init."""
        if self.matrix != "softmax":
            nn.init.zeros_(self.q.weight)  # W^Q = 0 (`query_init_std: 0`): Ã = α·I at init
            if self.q.bias is not None:
                nn.init.zeros_(self.q.bias)
        if self.values == "orthogonal":  # reference Value-SkipInit baseline: `val_init_type=orth`
            nn.init.orthogonal_(self.v.weight)
            nn.init.orthogonal_(self.out.weight)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k = self._heads(self.q(x)), self._heads(self.k(x))
        v = self._heads(self.v(x) if self.v is not None else x)
        plain = positions is None
        if self.rope is not None:
            pos = default_positions(b, t, x.device) if plain else positions
            q, k = self.rope.pair(q, k, pos)
        if cache is None and plain:
            y = self._causal(q, k, v)
        else:
            k, v, mask, identity = cached_keys_and_mask(k, v, positions, cache)
            if self.matrix == "softmax":
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                logits = q @ k.transpose(-1, -2) * self.head_dim**-0.5  # keep 1/√d_k (`scale_attn_weights`)
                y = shaped_attention_matrix(logits, mask, identity, self.alpha, self.beta, self.gamma) @ v
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.out(y) if self.out is not None else y

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        """[B, T, H·hd] → [B, H, T, hd]."""
        return z.view(z.shape[0], z.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Training path (no padding, no cache), q, k, v [B, H, T, hd] → [B, H, T, hd] without a T×T shaped matrix:
        Ã·V = β·softmax(QKᵀ/√d + M)·V − γ·C·V + α·V, where C·V is the running mean of V (C_ij = 1/i, j ≤ i)."""
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.matrix == "softmax":
            return y
        y = self.beta.view(1, -1, 1, 1) * y
        if self.gamma is not None:
            count = torch.arange(1, v.shape[2] + 1, device=v.device, dtype=v.dtype).view(1, 1, -1, 1)
            y = y - self.gamma.view(1, -1, 1, 1) * (v.cumsum(2) / count)
        return y + self.alpha.view(1, -1, 1, 1) * v


class LocalShapedAttention(nn.Module):
    """Griffin-SAS's attention block: x [B, T, D] (the block's normalised input), segment_pos [B, T] (0 = document
    start, −1 = pad), `RingKVCache` → [B, T, D]. With D = H·hd, head h's values are x's h-th slice of hd channels:

        q = RoPE(x W_q) [B, H, T, hd],  k = RoPE(x W_k) [B, H_kv, T, hd]     Griffin's multi-query keys (H_kv = 1)
        Ã_h = α_h·I + β_h·softmax(q_h kᵀ/√hd + M) − γ_h·C,   y_h = Ã_h · x_h   no W_V, no output projection
        M[q, k] = 0  iff  same document ∧ k ≤ q ≤ k + window, else −∞           (`local_attention.py`)
        C[q, k] = [M[q, k] = 0] / #{k' : M[q, k'] = 0}                          uniform over the visible window

    so every row of Ã_h sums to α_h + β_h − γ_h over the visible window (α_h while β_h = γ_h). α_h, β_h, γ_h start
    at 1 without weight decay; W_q = 0 at init makes the softmax equal C, hence Ã_h = I and y = x (He & Hofmann 2023,
    Sec. 4.2). W_k ~ N(0, 1/D) as Griffin's. The forward is blocked as the plain local attention (memory T × window);
    the ring cache stores the inputs x as the values, `v [B, H, window, hd]` (`RingKVCache(..., value_heads=H)`)."""

    def __init__(self, width: int, n_heads: int, kv_heads: int, head_dim: int, window: int,
                 rope_base: float = 10_000.0, rope_fraction: float = 0.5):
        super().__init__()
        if n_heads * head_dim != width:
            raise ValueError(f"identity values need n_heads·head_dim = width, got {n_heads}·{head_dim} ≠ {width}")
        self.n_heads, self.kv_heads, self.head_dim, self.window = n_heads, kv_heads, head_dim, window
        self.block = max(window, 64)  # query block length of the blocked forward
        self.proj_q = Linear(width, n_heads * head_dim, bias=False)
        self.proj_k = Linear(width, kv_heads * head_dim, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_base, rope_fraction)
        self.alpha = nn.Parameter(torch.ones(n_heads))
        self.beta = nn.Parameter(torch.ones(n_heads))
        self.gamma = nn.Parameter(torch.ones(n_heads))
        for gain in (self.alpha, self.beta, self.gamma):
            gain.no_weight_decay = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_q = 0 (Ã = I at init); W_k ~ N(0, 1/D) (GDM LocalAttentionBlock)."""
        nn.init.zeros_(self.proj_q.weight)
        nn.init.normal_(self.proj_k.weight, std=self.proj_k.in_features**-0.5)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> RingKVCache:
        """An empty ring of `window` slots (`max_len` is ignored: the state is bounded); its values are the
        normalised inputs split into all n_heads heads."""
        return RingKVCache(batch, self.kv_heads, self.window, self.head_dim, dtype, device, value_heads=self.n_heads)

    def forward(self, x: torch.Tensor, segment_pos: torch.Tensor, cache: RingKVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.proj_q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.proj_k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope.pair(q, k, segment_pos)
        v = x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        y = local_attend(q, k, v, segment_pos, cache, self.window, self.block, self._attend)
        return y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                identity: torch.Tensor) -> torch.Tensor:
        """q [B, H, Tq, hd], k [B, H_kv, S, hd], v [B, H, S, hd] → Ã v [B, H, Tq, hd]; query head h reads key head
        h // (H / H_kv), as SDPA's grouped-query attention."""
        b, _, tq, hd = q.shape
        group = self.n_heads // self.kv_heads
        logits = q.view(b, self.kv_heads, group, tq, hd) @ k[:, :, None].transpose(-1, -2)
        logits = logits.view(b, self.n_heads, tq, -1) * hd**-0.5
        return shaped_attention_matrix(logits, mask, identity, self.alpha, self.beta, self.gamma) @ v
