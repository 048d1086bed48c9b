"""Number-for-number parity with the official reference (`recurrentgemma==1.0.1`, its torch modules), fp32.

Weights reach kitelm through the converter (`kitelm.convert.recurrentgemma`), as a real checkpoint would. Tiny
random configs with non-zero norm scales and biases; window W = 4, so T = 3W crosses the window twice.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from griffin_reference import kitelm_twin, layers, modules, one_thread, randomize_, reference_griffin
from kitelm.convert.recurrentgemma import gdm_to_kitelm
from kitelm.layers.conv1d import Conv1D
from kitelm.layers.local_attention import LocalAttention, RingKVCache
from kitelm.layers.norms import RMSNorm
from kitelm.layers.rglru import RGLRU
from numerics import assert_fp32_close, model_reductions

W = 4
BLOCK = 8  # the RG-LRU gate blocks of `_rglru_pair` (32 channels / 4 heads): its reductions' length
CONFIGS = {
    "recurrentgemma": dict(pattern="RRARR", scale=True, softcap=30.0),  # lru_width ≠ width, attention, soft-cap
    "hawk": dict(pattern="R", scale=False, softcap=0.0, lru_width=48),
}


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_logits_match(model, ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Whole-model logits: fp32 rounding of ~6 reductions per layer of ≤ 96 terms (tests/numerics.py)."""
    assert_fp32_close(ours, ref, *model_reductions(model.config, 3 * W), name="logits")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    ref = reference_griffin(window=W, **CONFIGS[request.param])
    return ref, kitelm_twin(ref)


def ref_logits(ref, tokens, positions):
    with torch.no_grad():
        return ref(tokens, positions, return_cache=False)[0]


@pytest.mark.parametrize("T", [1, W, W + 1, 3 * W])
def test_full_forward_matches_reference(pair, T):
    ref, model = pair
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    positions = torch.arange(T).expand(2, T)
    with torch.no_grad():
        assert_logits_match(model, model(tokens), ref_logits(ref, tokens, positions))


@pytest.mark.parametrize("prompt_len", [1, 2, W - 1, W + 5])
def test_prefill_then_decode_matches_reference_forward(pair, prompt_len):
    ref, model = pair
    total = prompt_len + 3 * W
    tokens = torch.randint(0, 97, (2, total), generator=torch.Generator().manual_seed(prompt_len))
    expected = ref_logits(ref, tokens, torch.arange(total).expand(2, total))
    cache = model.new_cache(2)
    with torch.no_grad():
        got = [model(tokens[:, :prompt_len], torch.arange(prompt_len).expand(2, -1), cache)]
        got += [model(tokens[:, t:t + 1], cache=cache) for t in range(prompt_len, total)]
    assert_logits_match(model, torch.cat(got, 1), expected)


def test_packed_documents_match_reference_and_separate_runs(pair):
    ref, model = pair
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, 97, (1, n), generator=g) for n in (7, 2, 9)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        out = model(packed, positions)
        assert_logits_match(model, out, ref_logits(ref, packed, positions))
        start = 0
        for d in docs:
            alone = model(d)
            assert_logits_match(model, out[:, start:start + d.shape[1]], alone)
            start += d.shape[1]


def test_left_padded_rows_match_reference_unpadded(pair):
    """Pads carry position −1, the first real token 0 (GDM torch/sampler.py:232-238)."""
    ref, model = pair
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (3 * W, 2, W + 1)]
    tokens = torch.zeros(len(rows), 3 * W, dtype=torch.long)
    positions = torch.full((len(rows), 3 * W), -1)
    for i, r in enumerate(rows):
        tokens[i, 3 * W - len(r):], positions[i, 3 * W - len(r):] = r, torch.arange(len(r))
    with torch.no_grad():
        out = model(tokens, positions)
    for i, r in enumerate(rows):
        assert_logits_match(model, out[i, 3 * W - len(r):], ref_logits(ref, r[None], torch.arange(len(r))[None])[0])


def test_gradients_match_reference(pair):
    ref, model = pair
    tokens = torch.randint(0, 97, (2, 3 * W + 1), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(3 * W).expand(2, -1)
    ref_out, _ = ref(tokens[:, :-1], positions, return_cache=False)
    F.cross_entropy(ref_out.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    expected = gdm_to_kitelm({name: p.grad for name, p in ref.named_parameters()})
    terms, depth = model_reductions(model.config, tokens.numel())  # gradients also sum over the 2 × 12 tokens
    for name, p in model.named_parameters():
        assert_fp32_close(p.grad, expected[name], terms, 2 * depth, name=name)  # forward + backward
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def test_bfloat16_error_no_larger_than_reference(pair):
    """In bf16 the two differ by rounding (our attention softmax runs fused in fp32); measured against the fp32
    reference, our bf16 error stays within the reference's own bf16 error (×1.5)."""
    ref, model = pair
    tokens = torch.randint(0, 97, (2, 3 * W), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(3 * W).expand(2, -1)
    exact = ref_logits(ref, tokens, positions)
    with torch.no_grad():
        ours16 = copy.deepcopy(model).to(torch.bfloat16)(tokens)
    ref16 = ref_logits(copy.deepcopy(ref).to(torch.bfloat16), tokens, positions)
    assert max_diff(ours16, exact) <= 1.5 * max_diff(ref16, exact)


# ---------------------------------------------------------------------------------------------------- layers
def test_rmsnorm_matches_reference():
    ref = layers.RMSNorm(24)
    randomize_(ref, torch.Generator().manual_seed(0))
    ours = RMSNorm(24, 1e-6, unit_offset=True)
    ours.weight.data.copy_(ref.scale.data)
    x = torch.randn(2, 5, 24)
    assert_fp32_close(ours(x), ref(x), terms=24, depth=2, name="rmsnorm")  # mean of 24 squares, then the gain


def _conv_pair():
    ref = layers.Conv1D(16, temporal_width=4)
    randomize_(ref, torch.Generator().manual_seed(1))
    ours = Conv1D(16, 4)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_conv1d_with_document_reset_matches_reference():
    ref, ours = _conv_pair()
    x = torch.randn(2, 11, 16)
    pos = torch.tensor([list(range(5)) + list(range(6)), list(range(11))])
    y_ref, state_ref = ref(x.clone(), pos, return_cache=True)  # the reference masks its input in place
    y, state = ours(x, pos)
    assert_fp32_close(y, y_ref, terms=4, name="conv")  # 4 taps + bias per output
    assert_fp32_close(state, state_ref, terms=4, name="conv state")
    step = torch.randn(2, 1, 16)
    y_ref, _ = ref(step, torch.tensor([[6], [11]]), cache=state_ref[:, -3:], return_cache=True)
    assert_fp32_close(ours(step, torch.tensor([[6], [11]]), state)[0], y_ref, terms=4, name="conv step")


def test_conv1d_state_is_cut_at_a_document_start():
    """The state zeroes inputs that a later document start cuts off, so decoding right after a boundary equals the
    full forward (GDM's decode path applies no mask: torch/layers.py:531-550)."""
    _, ours = _conv_pair()
    x = torch.randn(1, 8, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])
    full, _ = ours(x, pos)
    _, state = ours(x[:, :7], pos[:, :7])
    assert_fp32_close(ours(x[:, 7:], pos[:, 7:], state)[0], full[:, 7:], terms=4, name="conv after a reset")


def _rglru_pair():
    ref = layers.RGLRU(32, num_heads=4)
    randomize_(ref, torch.Generator().manual_seed(2))
    ours = RGLRU(32, 4)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("with_h0", [False, True])
def test_rglru_matches_reference_values_and_gradients(with_h0):
    ref, ours = _rglru_pair()
    x = torch.randn(2, 9, 32)
    pos = torch.tensor([list(range(9)), [0, 1, 2, 0, 1, 2, 3, 0, 1]])  # resets mid-sequence
    h0 = torch.randn(2, 32) if with_h0 else None
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, h_ref = ref(x_ref, pos, cache=h0)
    y, h = ours(x_ours, pos, h0)
    assert h.dtype == torch.float32
    depth = 9 + 2  # the gates (one BLOCK-term reduction, then exp/sqrt), then 9 chained scan steps
    assert_fp32_close(y, y_ref, BLOCK, depth, name="y")
    assert_fp32_close(h, h_ref, BLOCK, depth, name="h")
    weights = torch.randn(2, 9, 32)
    (y_ref * weights).sum().backward()
    (y * weights).sum().backward()
    assert_fp32_close(x_ours.grad, x_ref.grad, BLOCK, 2 * depth, name="dx")
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):  # parameter gradients sum 2 × 9 tokens
        assert_fp32_close(p.grad, p_ref.grad, 2 * 9 * BLOCK, 2 * depth, name=name)


def test_rglru_decode_step_matches_reference():
    ref, ours = _rglru_pair()
    x, h0 = torch.randn(2, 1, 32), torch.randn(2, 32)
    pos = torch.tensor([[5], [0]])
    y_ref, h_ref = ref(x, pos, cache=h0)
    y, h = ours(x, pos, h0)
    assert_fp32_close(y, y_ref, BLOCK, depth=3, name="y")  # gates, then one step
    assert_fp32_close(h, h_ref, BLOCK, depth=3, name="h")


ATTENTION = (32, 5)  # width-32 projections in, scores, weighted sum of ≤ W + 1 keys, projection out: (terms, depth)


def _attention_pair(window):
    ref = modules.LocalAttentionBlock(32, num_heads=4, window_size=window, final_w_init_variance_scale=0.5)
    randomize_(ref, torch.Generator().manual_seed(3))
    ours = LocalAttention(32, 4, 1, 8, window)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("T", [3 * W + 1, 150])  # 150 tokens: several query blocks of the blocked forward
def test_local_attention_matches_reference(T):
    ref, ours = _attention_pair(W)
    x = torch.randn(2, T, 32)
    pos = torch.stack([torch.arange(T), torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)])])
    with torch.no_grad():
        y_ref, _ = ref(x, pos, return_cache=False)
        assert_fp32_close(ours(x, pos), y_ref, *ATTENTION, name="local attention")


def test_local_attention_decode_matches_reference_cache():
    """Prefill then decode across ring wrap-around against GDM's own cache path."""
    ref, ours = _attention_pair(W)
    x = torch.randn(2, 3 * W + 2, 32)
    pos = torch.arange(3 * W + 2).expand(2, -1)
    ring = RingKVCache(2, 1, W, 8, torch.float32)
    with torch.no_grad():
        y_ref, cache = ref(x[:, :3], pos[:, :3], return_cache=True)
        y = ours(x[:, :3], pos[:, :3], ring)
        assert_fp32_close(y, y_ref, *ATTENTION, name="prefill")
        for t in range(3, x.shape[1]):
            y_ref, cache = ref(x[:, t:t + 1], pos[:, t:t + 1], cache=cache, return_cache=True)
            assert_fp32_close(ours(x[:, t:t + 1], pos[:, t:t + 1], ring), y_ref, *ATTENTION, name=f"step {t}")
