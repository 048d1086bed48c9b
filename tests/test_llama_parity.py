"""The transformer baseline against transformers' `LlamaForCausalLM` (the peer `kitelm bench` measures, built from
the same config by `experiments/bench/peers.py`), with kitelm's weights copied in: the logits agree within the fp32
rounding bound of `numerics.py`, and to float64 precision when both run in float64."""

from __future__ import annotations

import pytest
import torch

from kitelm.config import ModelConfig
from kitelm.experiments.bench.peers import peer_for
from kitelm.models import build_model
from numerics import assert_fp32_close, model_reductions

pytest.importorskip("transformers")

CONFIGS = {
    "mha-swiglu": dict(n_heads=4, mlp="swiglu"),
    "gqa-geglu": dict(n_heads=4, n_kv_heads=2, mlp="geglu", rope_base=500_000.0),
    "mqa-swiglu-untied": dict(n_heads=4, n_kv_heads=1, mlp="swiglu", tie_embeddings=False, head_dim=24),
    "gqa-deep": dict(n_heads=8, n_kv_heads=2, mlp="swiglu", n_layers=6, norm_eps=1e-5),
}


def llama_state_dict(model) -> dict[str, torch.Tensor]:
    """kitelm Transformer weights under transformers' Llama names."""
    blocks = {"attn_norm": "input_layernorm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
              "attn.v": "self_attn.v_proj", "attn.out": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
              "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.embed.weight if model.head is None else model.head.weight}
    for i in range(len(model.blocks)):
        for ours, theirs in blocks.items():
            out[f"model.layers.{i}.{theirs}.weight"] = model.state_dict()[f"blocks.{i}.{ours}.weight"]
    return out


def pair(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=101, width=64, max_seq_len=64, **{"n_layers": 3, **CONFIGS[name]})
    ours = build_model(config).eval()
    with torch.no_grad():  # norm gains away from 1, so a norm applied in the wrong place shows
        for p in ours.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    _, hf = peer_for(config)
    missing, unexpected = hf.load_state_dict(llama_state_dict(ours), strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    return ours.to(dtype), hf.to(dtype).eval(), config


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_llama(name):
    ids = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(1))
    ours, hf, config = pair(name, torch.float64)
    with torch.no_grad():
        ours64, hf64 = ours(ids), hf(input_ids=ids).logits
    # the same function: float64 agrees up to kitelm's cast of the logits to float32 (half an ulp, 2^-24 relative)
    torch.testing.assert_close(ours64.double(), hf64, rtol=2.0**-23, atol=1e-12)

    ours, hf, _ = pair(name, torch.float32)
    with torch.no_grad():
        ours32, hf32 = ours(ids), hf(input_ids=ids).logits.float()
    terms, depth = model_reductions(config, ids.shape[1])
    assert_fp32_close(ours32, hf32, terms, depth, name=name)
    assert_fp32_close(ours32, hf64, terms, depth, name=f"{name} vs float64")


def test_the_comparison_fails_for_a_different_model():
    """One permuted weight (two query heads swapped) is seen far above the bound."""
    ours, hf, config = pair("gqa-geglu", torch.float32)
    with torch.no_grad():
        q = ours.blocks[1].attn.q.weight
        q.copy_(torch.cat([q[16:32], q[:16], q[32:]]))
    ids = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.raises(AssertionError, match="exceeds the fp32 bound"):
        assert_fp32_close(ours(ids), hf(input_ids=ids).logits, *model_reductions(config, ids.shape[1]))
