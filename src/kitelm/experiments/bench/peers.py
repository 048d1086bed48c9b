"""The peers kitelm is measured against, built at the same configuration: transformers' `LlamaForCausalLM` (for the
transformer baseline) and `RecurrentGemmaForCausalLM` (for Griffin / Hawk). Optional: absent packages are skipped."""

from __future__ import annotations

import torch

from ...models.griffin import BLOCK_KINDS

HF_ACT = {"geglu": "gelu_pytorch_tanh", "swiglu": "silu"}


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def peer_for(config) -> tuple[str, torch.nn.Module] | None:
    """(name, randomly initialised HF model with the same sizes as `config`), or None when there is no peer."""
    if not transformers_available():
        return None
    if config.arch == "transformer" and config.mlp in HF_ACT:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.width,
                         intermediate_size=config.mlp_width, num_hidden_layers=config.n_layers,
                         num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
                         head_dim=config.dim_per_head, hidden_act=HF_ACT[config.mlp], rms_norm_eps=config.norm_eps,
                         max_position_embeddings=1 << 17, rope_theta=config.rope_base,
                         tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False)
        return "transformers Llama", LlamaForCausalLM(hf).eval()
    if config.arch == "griffin":
        from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

        hf = RecurrentGemmaConfig(num_hidden_layers=config.n_layers, vocab_size=config.vocab_size,
                                  hidden_size=config.width, intermediate_size=2 * config.mlp_width,
                                  num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
                                  lru_width=config.recurrent_width,
                                  attention_window_size=config.attention_window, conv1d_width=config.conv_width,
                                  logits_soft_cap=config.logit_softcap or 1e9,  # HF always caps; 1e9 ≈ none
                                  rms_norm_eps=config.norm_eps,
                                  partial_rotary_factor=config.rope_fraction, rope_theta=config.rope_base,
                                  block_types=[BLOCK_KINDS[c] for c in config.block_pattern])
        return "transformers RecurrentGemma", RecurrentGemmaForCausalLM(hf).eval()
    return None
