"""The baseline transformer: incremental decoding equals the full forward; causality; padding."""

import pytest
import torch

from kitelm.config import ModelConfig
from kitelm.generate import left_pad
from kitelm.models import build_model
from numerics import assert_fp32_close, model_reductions

VARIANTS = {
    "mha-geglu": dict(n_heads=4),
    "gqa-relu": dict(n_heads=4, n_kv_heads=2, mlp="relu"),
    "mqa-swiglu-untied": dict(n_heads=4, n_kv_heads=1, mlp="swiglu", tie_embeddings=False),
    "partial-rope": dict(n_heads=2, rope_fraction=0.5, logit_softcap=30.0),
}


def make(**kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=97, width=64, n_layers=3, **kw)).eval()
    with torch.no_grad():  # non-trivial norm gains so a bug in any path shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decode_matches_full_forward(variant):
    model = make(**VARIANTS[variant])
    tokens = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, max_len=23)
        pieces = [model(tokens[:, :9], cache=cache)]  # prefill
        pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(9, 17)]  # decode
        pieces.append(model(tokens[:, 17:], cache=cache))  # a chunk of several tokens on top of the cache
    assert_fp32_close(torch.cat(pieces, 1), full, *model_reductions(model.config, 23), name="cached vs full")


def test_left_padded_batch_matches_each_row_alone():
    model = make(n_heads=4, n_kv_heads=2)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 11, 1)]
    tokens, positions = left_pad(prompts)
    with torch.no_grad():
        cache = model.new_cache(3, max_len=tokens.shape[1] + 4)
        batched = [model(tokens, positions, cache)[:, -1]]
        follow = torch.randint(0, 97, (3, 4))
        batched += [model(follow[:, i:i + 1], cache=cache)[:, -1] for i in range(4)]
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + follow[row].tolist()]))[0, len(prompt) - 1:]
            got = torch.stack([b[row] for b in batched])
            assert_fp32_close(got, alone, *model_reductions(model.config, tokens.shape[1] + 4), name=f"row {row}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    model = make(**VARIANTS[variant])
    tokens = torch.randint(0, 97, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = torch.randint(0, 97, (8,))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)  # bitwise: the same ops on the same rows
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gradients_reach_every_parameter():
    model = make(n_heads=4, n_kv_heads=2).train()
    tokens = torch.randint(0, 97, (2, 16))
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_cache_overflow_is_a_clear_error():
    model = make(n_heads=4)
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(Exception, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
