"""Griffin / Hawk behaviour beyond the reference: bounded state, chunked continuation, left-padded batches,
presets, training through the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from griffin_reference import one_thread, randomize_
from kitelm.cli import main
from kitelm.config import ModelConfig
from kitelm.presets import get_preset
from kitelm.errors import ConfigError
from kitelm.generate import Sampling, generate_tokens
from kitelm.layers import local_attention
from kitelm.layers.local_attention import LocalAttention, RingKVCache
from kitelm.models import build_model
from kitelm.models.griffin import Griffin
from kitelm.ops import decode
from numerics import assert_fp32_close, model_reductions

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def tiny(pattern="RRA", window=4, seed=0):
    """griffin-tiny with a small window (the ring wraps) and non-zero norm scales and biases."""
    torch.manual_seed(seed)
    model = build_model(get_preset("griffin-tiny").replace(block_pattern=pattern, attention_window=window,
                                                           lru_width=96, embed_scale_sqrt=True, logit_softcap=30.0))
    randomize_(model, torch.Generator().manual_seed(seed))
    return model.eval()


def test_recurrentgemma_presets_have_the_published_sizes():
    m2 = build_model(get_preset("recurrentgemma-2b"), device="meta")
    m9 = build_model(get_preset("recurrentgemma-9b"), device="meta")
    assert round(m2.num_params() / 1e9, 3) == 2.683 and round(m2.num_params(True) / 1e9, 3) == 2.028
    assert round(m9.num_params() / 1e9, 2) == 8.58
    assert m2.embed_scale == 50.5  # bf16(√2560), GDM torch/modules.py:994-998
    assert [b.kind for b in m2.blocks][:3] == ["recurrent", "recurrent", "attention"]
    assert set(Griffin.block_kinds(get_preset("hawk-7b"))) == {"recurrent"}


@pytest.mark.parametrize("pattern", ["RRA", "R"])
def test_state_size_independent_of_length(pattern):
    model = tiny(pattern)
    cache = model.new_cache(2, max_len=10)
    empty = cache.nbytes()
    with torch.no_grad():
        model(torch.randint(0, 257, (2, 50)), torch.arange(50).expand(2, -1), cache)
        after_prefill = cache.nbytes()
        for _ in range(30):
            model(torch.randint(0, 257, (2, 1)), cache=cache)
    assert empty == after_prefill == cache.nbytes() > 0


@pytest.mark.parametrize("pattern", ["RRA", "R"])
def test_chunked_continuation_matches_full_forward(pattern):
    model = tiny(pattern)
    tokens = torch.randint(0, 257, (2, 40))
    positions = torch.cat([torch.arange(23), torch.arange(17)]).expand(2, -1)  # a document starts at 23
    with torch.no_grad():
        full = model(tokens, positions)
        cache = model.new_cache(2)
        pieces, start = [], 0
        for n in (3, 9, 1, 11, 1, 15):  # chunks shorter and longer than the window, one across the boundary
            pieces.append(model(tokens[:, start:start + n], positions[:, start:start + n], cache))
            start += n
    assert_fp32_close(torch.cat(pieces, 1), full, *model_reductions(model.config, 40), name="chunked vs full")


def test_left_padded_batch_generation_matches_single_rows():
    model = tiny()
    prompts = [[5, 9, 11, 200, 3, 7, 8], [42], [1, 2, 3, 4]]
    batched = torch.stack(list(generate_tokens(model, prompts, 12, Sampling(temperature=0))), 1)
    for row, prompt in enumerate(prompts):
        single = torch.stack(list(generate_tokens(model, [prompt], 12, Sampling(temperature=0))), 1)
        assert torch.equal(batched[row], single[0])


def test_recurrent_state_stays_float32_in_bfloat16():
    model = tiny().to(torch.bfloat16)
    cache = model.new_cache(1)
    with torch.no_grad():
        logits = model(torch.randint(0, 257, (1, 6)), torch.arange(6)[None], cache)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert cache.layers[0].h.dtype == torch.float32 and cache.layers[0].conv.dtype == torch.bfloat16


def test_local_attention_scores_grow_with_window_not_length(monkeypatch):
    """The full-sequence forward never builds T × T scores: every block sees at most window + block keys."""
    model = tiny(window=8)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(k.shape[2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(local_attention.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(torch.randint(0, 257, (1, 700)))
    block = model.blocks[2].temporal_block.block
    assert max(seen) <= 8 + block < 700 and len(seen) == -(-700 // block)


def test_exactly_causal_blocks_take_sdpa_is_causal(monkeypatch):
    """A block whose mask is the causal one (a prefill of one document per row within the window) goes to SDPA as
    `is_causal` and equals the explicit mask; a document start inside a row, or a non-square mask, keeps the mask."""
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    broken = mask.clone()
    broken[1, 0, 3:, :3] = False  # row 1: a document starts at token 3
    assert local_attention.is_causal_mask(mask)
    assert not local_attention.is_causal_mask(broken) and not local_attention.is_causal_mask(mask[..., :4])
    attention = LocalAttention(32, 4, 1, 8, window=16)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    causal_calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        causal_calls.append(kwargs.get("is_causal", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(local_attention.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        fast, masked = attention._attend(q, k, v, mask, None), attention._attend(q, k, v, broken, None)
    assert causal_calls == [True, False]
    assert_fp32_close(fast, sdpa(q, k, v, attn_mask=mask, enable_gqa=True), terms=5 + 8, depth=2)
    assert_fp32_close(masked, sdpa(q, k, v, attn_mask=broken, enable_gqa=True), terms=5 + 8, depth=2)


@pytest.mark.parametrize("isa", decode.available_isas() or ["plain"])  # attend_ring's paths (none built: the twin)
@pytest.mark.parametrize("heads, kv_heads, hd, count", [(4, 1, 8, 9), (4, 2, 8, 9), (3, 3, 8, 9), (4, 1, 8, 3),
                                                      (10, 1, 64, 9), (7, 1, 128, 3)])
def test_decoding_attention_matches_the_concatenating_sdpa_step(heads, kv_heads, hd, count, isa, monkeypatch):
    """`softmax_attend_one` (ring and own key scored apart, no K/V repeat) against `attend_one` + SDPA, the path it
    replaces for fp32/fp64, over three steps: rows with empty slots, another document in the ring and a document
    start at the query; `count` 3: a ring that has not wrapped (only its first slots are scored). float64 pins the
    maths; float32 (the `attend_ring` kernel on each path: its AVX2 / AVX-512 loops where hd % 64 == 0, in blocks of
    2 to 5 query heads and single heads for the rest) stays within the rounding bound of its sums."""
    monkeypatch.setenv("KITELM_DECODE_ISA", isa)
    window, batch = 6, 3
    gen = torch.Generator().manual_seed(0)
    attention = LocalAttention(heads * hd, heads, kv_heads, hd, window)
    k0, v0 = (torch.randn(batch, kv_heads, window, hd, generator=gen, dtype=torch.float64) for _ in range(2))
    rings = {}
    for name, dtype in (("fast", torch.float64), ("sdpa", torch.float64), ("fast32", torch.float32)):
        ring = rings[name] = RingKVCache(batch, kv_heads, window, hd, dtype)
        ring.k.copy_(k0)
        ring.v.copy_(v0)
        ring.segment.copy_(torch.tensor([[4] * window, [-1, -1, 4, 4, 4, 4], [3, 3, 4, 4, 4, 3]]))
        ring.segment[:, count:] = -1  # the slots a ring that saw `count` tokens has not written yet
        ring.last_segment.fill_(4)
        ring.count = count
    for step, starts in enumerate(([False, False, False], [False, True, False], [True, True, True])):
        q = 3 * torch.randn(batch, heads, 1, hd, generator=gen, dtype=torch.float64)  # peaked softmaxes too
        k, v = (torch.randn(batch, kv_heads, 1, hd, generator=gen, dtype=torch.float64) for _ in range(2))
        segment_pos = torch.tensor([[0 if start else 5 + step] for start in starts])
        ref = local_attention.attend_one(q, k, v, segment_pos, rings["sdpa"], attention._attend)
        fast = local_attention.softmax_attend_one(q, k, v, segment_pos, rings["fast"])
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)  # float64: the two summation orders agree
        with torch.no_grad():  # the kernel's condition, as in decoding
            fast32 = local_attention.softmax_attend_one(q.float(), k.float(), v.float(), segment_pos, rings["fast32"])
        assert_fp32_close(fast32, ref, terms=window + 1 + hd, depth=2, name=f"float32 step {step}")
        for name in ("k", "v", "segment", "last_segment"):
            assert torch.equal(getattr(rings["fast"], name), getattr(rings["sdpa"], name)), name
    assert rings["fast"].count == rings["sdpa"].count == count + 3


def test_gradients_reach_every_parameter():
    model = tiny().train()
    tokens = torch.randint(0, 257, (2, 20))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("change, message", [
    (dict(lru_width=66), "does not divide lru_width"),
    (dict(block_pattern="RXA"), "block_pattern"),
    (dict(mlp="relu"), "gated MLP"),
    (dict(conv_width=1), "conv_width=1 must be an integer >= 2"),  # its state slice would keep every input
])
def test_invalid_griffin_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("griffin-tiny").replace(**change)


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny"])
def test_train_and_generate_through_the_cli(preset, corpus_dir, tmp_path, capsys):
    args = ["--model", preset, "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
            "--save-every", "3", "--eval-tokens", "128", "--final-eval-tokens", "256", "--no-sample"]
    assert main(["train", "--data", str(corpus_dir), "--out", str(tmp_path), *args]) == 0
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "def f(", "x = 1", "--max-new-tokens", "5",
                 "--greedy"]) == 0
    assert capsys.readouterr().out.count("--- [") == 2


def test_config_round_trip_keeps_griffin_fields(tmp_path):
    config = get_preset("recurrentgemma-2b")
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config
