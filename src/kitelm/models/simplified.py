"""Simplified transformer blocks (He & Hofmann, "Simplifying Transformer Blocks", ICLR 2024, arXiv 2311.01906).

One gain-parameterised block covers the paper's variants, from Pre-LN to SAS-P without normalisation:

    sequential (Eq. 1):  X̂ = α_SA·X + β_SA·MHA(Norm₁(X)),     X_out = α_FF·X̂ + β_FF·MLP(Norm₂(X̂))
    parallel   (Eq. 7):  X_out = α_comb·X + β_SA·MHA(Norm(X)) + β_FF·MLP(Norm(X))        (one shared norm)
    SAS attention (Eq. 12-13):  MHÃ(X) = Concat_h[(α_h·I + β_h·A_h(X) − γ_h·C)·X_h]    (no W^V, no W^P)

A removed skip is absent (not a zero gain); a fixed gain of 1 is no parameter at all. With `trainable_gains` the kept
block gains are trainable scalars without weight decay, α = β_SA = 1 and β_FF = `mlp_gain_init` at init. Shaped
attention, values and projections live in `kitelm.layers.shaped_attention`.

Deltas from kitelm's `transformer` baseline, all taken from the reference code (bobby-he/simplified_transformers
`model_utils.py`) so that the paper's numbers can be checked:
- optional learned absolute positions (GPT-2's `wpe`; the paper's text says sinusoidal, its code learns them);
- every Linear/Embedding ~ N(0, init_std), no 1/√(2L) down-scaling of output projections (`MyConv1D`);
- optional biases on W^Q, W^K (GPT-2's fused `c_attn`); none on W^V, W^P or the MLP;
- optional LayerNorm as the final norm (HF GPT-2's `ln_f`); blocks use RMSNorm;
- without block norms, the input norm of block 1 and the final norm stay ("always use LN in first layer");
- "non-embedding" parameters exclude the position table too (the reference's −16.2 % counts them that way).

| paper (figure / section)                     | config (presets `<name>-small` and `<name>-paper`)                     |
|----------------------------------------------|-------------------------------------------------------------------------|
| Pre-LN (Fig. 1 left)                          | `preln`: defaults                                                       |
| Parallel, GPT-J (Fig. 1 bottom right, Eq. 7)  | `parallel`: parallel_block                                              |
| V-SkipInit baseline (Figs. 2, 5, 6, 26)       | `vskipinit`: attn_skip=False, attn_matrix=shaped, value_proj=orthogonal, |
|                                               |   trainable_gains, β_FF small (reference `baseline_comparison.sh`)      |
| Value-SkipInit matrix αI + βA (Eq. 4, Fig. 13)| attn_matrix=skipinit                                                    |
| SAS (Sec. 4.2, Fig. 10)                       | `sas`: as vskipinit with value_proj=identity, first_layer_value         |
| SAS-P (Sec. 4.3, Fig. 11)                     | `sas-p`: sas + parallel_block, mlp_skip=False                           |
| SAS-P without norm ("Ours", Fig. 1 top right) | `sas-p-nonorm`: sas-p + block_norms=False                               |
| no MLP skip in a sequential block (Fig. 25)   | sas + mlp_skip=False + allow_unstable_blocks (fails, as in the paper)   |
| identity V/P with skips (Fig. 23)             | preln + value_proj=identity, first_layer_value=False                    |
| first value matrix kept or not (Fig. 24)      | first_layer_value                                                       |
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import KitelmError
from ..layers.attention import KVCache
from ..layers.mlp import MLP
from ..layers.norms import RMSNorm
from ..layers.rope import RotaryEmbedding
from ..layers.shaped_attention import ATTENTION_MATRICES, VALUE_PROJECTIONS, ShapedAttention
from .base import LanguageModel, init_linear_

NORMS = ("rms", "layer")


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    """RMSNorm, or LayerNorm with bias (GPT-2's `ln_f`, which the reference keeps)."""
    return RMSNorm(width, eps) if kind == "rms" else nn.LayerNorm(width, eps=eps)


def scaled(gain: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """gain·x, where None stands for a fixed gain of 1."""
    return x if gain is None else gain * x


class SimplifiedBlock(nn.Module):
    """x [B, T, D] → [B, T, D]: one block of the family in the module docstring; `index` is the 0-based layer."""

    def __init__(self, config, index: int, rope: RotaryEmbedding | None):
        super().__init__()
        c = config
        self.parallel, self.attn_skip, self.mlp_skip = c.parallel_block, c.attn_skip, c.mlp_skip
        if c.block_norms:
            self.norm1 = make_norm("rms", c.width, c.norm_eps)
        else:  # the reference keeps a LayerNorm on block 1's input "to normalise input activation norms"
            self.norm1 = make_norm(c.final_norm, c.width, c.norm_eps) if index == 0 else nn.Identity()
        if not c.parallel_block:  # the reference builds ln_2 in parallel blocks but never uses it: we do not build it
            self.norm2 = make_norm("rms", c.width, c.norm_eps) if c.block_norms else nn.Identity()
        self.attn = ShapedAttention(c.width, c.n_heads, c.dim_per_head, rope, c.attn_matrix, c.value_proj,
                                    first_layer_value=c.first_layer_value and index == 0, qk_bias=c.qk_bias)
        self.mlp = MLP(c.width, c.mlp_width, c.mlp)
        # Gains: β_SA = α_SA = α_FF (α_comb) = 1 and β_FF = mlp_gain_init at init (App. D.1, code default.yaml).
        self._gain("alpha_sa", 1.0, c.trainable_gains and c.attn_skip and not c.parallel_block)
        self._gain("beta_sa", 1.0, c.trainable_gains)
        self._gain("alpha_ff", 1.0, c.trainable_gains and c.mlp_skip)
        self._gain("beta_ff", c.mlp_gain_init, c.trainable_gains)

    def _gain(self, name: str, init: float, trainable: bool) -> None:
        """A scalar [1]: a trainable Parameter excluded from weight decay, a fixed buffer, or None for a fixed 1."""
        if trainable:
            gain = nn.Parameter(torch.full((1,), init))
            gain.no_weight_decay = True  # reference train_utils.py: no weight decay on any gain
            setattr(self, name, gain)
        elif init != 1.0:
            self.register_buffer(name, torch.full((1,), init), persistent=False)
        else:
            setattr(self, name, None)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> KVCache:
        return self.attn.new_state(batch, max_len, dtype, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        h = self.norm1(x)
        attn = scaled(self.beta_sa, self.attn(h, positions, cache))
        if self.parallel:
            out = attn + scaled(self.beta_ff, self.mlp(h))
            return out + scaled(self.alpha_ff, x) if self.mlp_skip else out
        x_hat = attn + scaled(self.alpha_sa, x) if self.attn_skip else attn
        out = scaled(self.beta_ff, self.mlp(self.norm2(x_hat)))
        return out + scaled(self.alpha_ff, x_hat) if self.mlp_skip else out


class SimplifiedTransformer(LanguageModel):
    """Embedding (+ learned positions) → SimplifiedBlocks → final norm → tied head."""

    def __init__(self, config):
        super().__init__(config)
        learned = config.pos_embedding == "learned"
        self.pos_embed = nn.Embedding(config.max_seq_len, config.width) if learned else None
        rope = None if learned else RotaryEmbedding(config.dim_per_head, config.rope_base, config.rope_fraction)
        self.blocks = nn.ModuleList(SimplifiedBlock(config, i, rope) for i in range(config.n_layers))
        self.norm = make_norm(config.final_norm, config.width, config.norm_eps)
        # N(0, 0.02) everywhere with no output down-scaling: App. D.1 and `MyConv1D` (nn.init.normal_(std=0.02)).
        init_linear_(self, config.init_std, config.init_std)
        for block in self.blocks:
            block.attn.reset_special_parameters()

    @staticmethod
    def validate_config(c, need) -> None:
        need(c.pos_embedding in ("rope", "learned"), f"pos_embedding={c.pos_embedding!r}; choose rope or learned")
        need(c.attn_matrix in ATTENTION_MATRICES,
             f"attn_matrix={c.attn_matrix!r}; choose one of {list(ATTENTION_MATRICES)}")
        need(c.value_proj in VALUE_PROJECTIONS, f"value_proj={c.value_proj!r}; choose one of {list(VALUE_PROJECTIONS)}")
        need(c.final_norm in NORMS, f"final_norm={c.final_norm!r}; choose one of {list(NORMS)}")
        need(c.kv_heads == c.n_heads, "arch=simplified is multi-head (the paper's blocks); leave n_kv_heads unset")
        need(c.value_proj != "identity" or c.n_heads * c.dim_per_head == c.width,
             "value_proj=identity splits the stream into heads: n_heads·head_dim must equal width")
        need(not c.parallel_block or c.attn_skip == c.mlp_skip,
             "a parallel block has one skip α_comb·x: set attn_skip and mlp_skip both true (Parallel) or both false "
             "(SAS-P)")
        need(c.mlp_gain_init > 0, f"mlp_gain_init={c.mlp_gain_init} must be positive")
        if c.allow_unstable_blocks:
            return
        hint = " (set allow_unstable_blocks=true to train it anyway)"
        skipless = not c.attn_skip
        need(not skipless or c.attn_matrix != "softmax",
             "removing the attention skip with a plain softmax attention matrix causes rank collapse (paper Sec. 4.1);"
             " use attn_matrix=shaped so the attention matrix is identity-dominant at init" + hint)
        need(c.parallel_block or c.mlp_skip,
             "removing the MLP skip of a sequential block trains significantly slower and needs a 10x lower LR, even "
             "with shaped attention (paper Sec. 4.3, Fig. 25); use parallel_block=true (SAS-P) instead" + hint)
        need(not skipless or c.mlp_gain_init < 1,
             "a block without attention skip needs a down-weighted MLP branch, β_FF = O(1/√depth) < 1 at init "
             "(paper Sec. 4.1: 0.1 at 18 layers); lower mlp_gain_init" + hint)

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings plus, with `pos_embedding="learned"`, the learned position table (GPT-2's `wpe`)."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(self._table_positions(input_ids, positions))
        return x

    def _table_positions(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Rows of the learned table: 0..T−1, or `positions` with pads (−1) reading row 0 (they are masked)."""
        limit = self.config.max_seq_len
        if positions is None:
            t = input_ids.shape[1]
            if t > limit:
                raise KitelmError(f"sequence of {t} tokens exceeds the {limit} learned positions (max_seq_len)")
            return torch.arange(t, device=input_ids.device)
        if int(positions.max()) >= limit:
            raise KitelmError(f"position {int(positions.max())} exceeds the {limit} learned positions (max_seq_len); "
                              "shorten the prompt and generation or use pos_embedding=rope")
        return positions.clamp(min=0)

    def num_params(self, non_embedding: bool = False) -> int:
        """As `LanguageModel.num_params`; non-embedding also leaves out the learned position table."""
        n = super().num_params(non_embedding)
        return n - self.pos_embed.weight.numel() if non_embedding and self.pos_embed is not None else n
