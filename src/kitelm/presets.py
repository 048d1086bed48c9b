"""Named model configurations: the preset registry and every built-in preset, grouped by architecture.

The vocabulary size of a preset is the byte-level tokenizer's (257); training with another tokenizer replaces it.
"""

from __future__ import annotations

import dataclasses
import difflib

from .config import ModelConfig
from .errors import ConfigError

PRESETS: dict[str, ModelConfig] = {}


def register_preset(config: ModelConfig) -> ModelConfig:
    """Add a named config to the registry (names are unique)."""
    if config.name in PRESETS:
        raise ValueError(f"preset {config.name!r} is registered twice")
    PRESETS[config.name] = config
    return config


def get_preset(name: str) -> ModelConfig:
    """Return a copy of the preset `name`; an unknown name raises ConfigError with the closest matches."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=3)
        raise ConfigError(f"unknown preset {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                          + " (run `kitelm presets` for the list)")
    return dataclasses.replace(PRESETS[name])


def list_presets() -> list[ModelConfig]:
    return list(PRESETS.values())


def preset_rows() -> list[dict]:
    """Name, architecture and parameter counts of every preset (built on the meta device: no memory, no time)."""
    from .models import build_model

    rows = []
    for config in list_presets():
        model = build_model(config, device="meta")
        rows.append({"model": config.name, "arch": config.arch, "params": model.num_params(),
                     "non_embedding_params": model.num_params(non_embedding=True)})
    return rows


# --- baseline transformer -------------------------------------------------------------------------------------
register_preset(ModelConfig(name="transformer-tiny", width=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
# The default of `kitelm train` before griffin-mini: 1.82M parameters that see ~2.6M tokens in 8 minutes
# on 2 CPU cores, closer to compute-optimal (Chinchilla: ~20 tokens per parameter) than a larger model would be.
register_preset(ModelConfig(name="transformer-mini", width=192, n_layers=4, n_heads=6, max_seq_len=256))
# Matched in size (~4.9M) with griffin-small, hawk-small and the *-small simplified presets, for comparisons.
register_preset(ModelConfig(name="transformer-small", width=256, n_layers=6, n_heads=8, n_kv_heads=8, max_seq_len=256))
register_preset(ModelConfig(name="transformer-base", width=768, n_layers=12, n_heads=12, max_seq_len=1024))
register_preset(ModelConfig(name="transformer-1b", width=2048, n_layers=16, n_heads=16, n_kv_heads=4,
                            max_seq_len=2048))

# --- Griffin / Hawk / RecurrentGemma ----------------------------------------------------------------------------
# GDM recurrentgemma/common.py:46-114. MQA (1 K/V head), head_dim = width / n_heads,
# n_heads also counts the RG-LRU gate blocks, MLP expansion 3, RoPE on half of each head, (R, R, A) cycled.
_GRIFFIN = dict(arch="griffin", n_kv_heads=1, mlp="geglu", rope_fraction=0.5, tie_embeddings=True)
register_preset(ModelConfig(name="griffin-tiny", width=64, n_layers=3, n_heads=4, mlp_hidden=192,
                            attention_window=16, max_seq_len=128, **_GRIFFIN))
register_preset(ModelConfig(name="hawk-tiny", width=64, n_layers=2, n_heads=4, mlp_hidden=192, block_pattern="R",
                            max_seq_len=128, **_GRIFFIN))
# The default of `kitelm train`: transformer-mini's size and step time (1.87M parameters), width 192, 4 layers
# (R, R, A, R), MLP 3·width; at byte level its Conv1D + recurrence learn faster per step than attention and beat
# xz -9 in 300 steps (benchmarks/NOTES.md, "The main job against xz").
register_preset(ModelConfig(name="griffin-mini", width=192, n_layers=4, n_heads=4, mlp_hidden=576,
                            attention_window=128, max_seq_len=256, **_GRIFFIN))
# Comparable to transformer-small (width 256, 6 layers, 256-token context): trains on 2 CPU cores.
register_preset(ModelConfig(name="griffin-small", width=256, n_layers=6, n_heads=4, mlp_hidden=768,
                            attention_window=128, max_seq_len=256, **_GRIFFIN))
register_preset(ModelConfig(name="hawk-small", width=256, n_layers=6, n_heads=4, mlp_hidden=768, block_pattern="R",
                            max_seq_len=256, **_GRIFFIN))
# Griffin-SAS: griffin-tiny / griffin-small with the simplified (shaped, value- and projection-free)
# local attention as the A block: each A block drops W_V and W_final (D·hd + D² + D parameters) and adds 3·H gains.
register_preset(ModelConfig(name="griffin-sas-tiny", width=64, n_layers=3, n_heads=4, mlp_hidden=192,
                            attention_window=16, max_seq_len=128, attention_kind="shaped", **_GRIFFIN))
register_preset(ModelConfig(name="griffin-sas-small", width=256, n_layers=6, n_heads=4, mlp_hidden=768,
                            attention_window=128, max_seq_len=256, attention_kind="shaped", **_GRIFFIN))
# The paper's 7B presets (GDM common.py Preset.GRIFFIN_PAPER_7B / HAWK_PAPER_7B): no embedding scale, no soft-cap.
_PAPER_7B = dict(width=4096, n_layers=32, n_heads=32, mlp_hidden=12288, lru_width=5632, attention_window=1024,
                 vocab_size=256_000, max_seq_len=2048, **_GRIFFIN)
register_preset(ModelConfig(name="griffin-7b", **_PAPER_7B))
register_preset(ModelConfig(name="hawk-7b", block_pattern="R", **_PAPER_7B))
# RecurrentGemma (Botev et al. 2024): 2.683B and 8.580B parameters; embeddings scaled by bf16(√D), soft-cap 30.
_RG = dict(vocab_size=256_000, attention_window=2048, embed_scale_sqrt=True, logit_softcap=30.0, max_seq_len=8192,
           **_GRIFFIN)
register_preset(ModelConfig(name="recurrentgemma-2b", width=2560, n_layers=26, n_heads=10, mlp_hidden=7680, **_RG))
register_preset(ModelConfig(name="recurrentgemma-9b", width=4096, n_layers=38, n_heads=16, mlp_hidden=12288, **_RG))

# --- Simplified transformer blocks ------------------------------------------------------------------------------
# He & Hofmann 2023; `models/simplified.py` maps each variant to the paper's figures. Both sizes follow the reference
# code's GPT-2 (bobby-he/simplified_transformers): learned positions, Q/K biases, LayerNorm `ln_f`, RMSNorm blocks,
# a bias-free ReLU MLP of 4·width (`leaky_relu` with slope 0). Skipless variants start with β_FF = 0.1 at 18 layers
# (App. D.1) and 0.1·√(18/6) ≈ 0.173 at 6 layers, keeping the paper's O(1/√depth) rule.
_SHAPED = dict(attn_skip=False, attn_matrix="shaped", trainable_gains=True)
_SIMPLIFIED_VARIANTS = {
    "preln": {},
    "parallel": dict(parallel_block=True),
    "vskipinit": dict(value_proj="orthogonal", **_SHAPED),  # reference `baseline_comparison.sh`, val_init_type=orth
    "sas": dict(value_proj="identity", **_SHAPED),
    "sas-p": dict(value_proj="identity", parallel_block=True, mlp_skip=False, **_SHAPED),
    "sas-p-nonorm": dict(value_proj="identity", parallel_block=True, mlp_skip=False, block_norms=False, **_SHAPED),
}
_SIMPLIFIED_SIZES = {
    # CPU size, comparable to transformer-small; 4 heads keep the paper's head dimension of 64; 1,024 learned
    # positions as GPT-2 (the reference trains at T = 128 with them), so generation can run past the training length.
    "small": (dict(width=256, n_layers=6, n_heads=4, max_seq_len=1024), round(0.1 * (18 / 6) ** 0.5, 3)),
    # The paper's CodeParrot model: 18 layers, d = 768, 12 heads, vocab 50,000, 1,024 positions (Sec. 4, App. D.1).
    "paper": (dict(width=768, n_layers=18, n_heads=12, vocab_size=50_000, max_seq_len=1024), 0.1),
}
for _variant, _options in _SIMPLIFIED_VARIANTS.items():
    for _size, (_dims, _beta_ff) in _SIMPLIFIED_SIZES.items():
        _skipless = not _options.get("attn_skip", True)
        register_preset(ModelConfig(name=f"{_variant}-{_size}", arch="simplified", mlp="relu", pos_embedding="learned",
                                    qk_bias=True, final_norm="layer", mlp_gain_init=_beta_ff if _skipless else 1.0,
                                    **_dims, **_options))
