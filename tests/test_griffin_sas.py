"""Griffin-SAS: the simplified shaped, value/projection-free local attention as Griffin's A block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from griffin_reference import one_thread, randomize_
from kitelm.config import ModelConfig
from kitelm.presets import get_preset
from kitelm.errors import ConfigError
from kitelm.generate import Sampling, generate_tokens
from kitelm.layers import shaped_attention
from kitelm.layers.shaped_attention import LocalShapedAttention
from kitelm.models import build_model
from numerics import assert_fp32_close, model_reductions

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
WIDTH, HEADS, HD = 32, 4, 8
LAYER = (150, 4)  # one attention layer: sums of ≤ 150 terms (the dense reference's rows) in 4 chained reductions


def randomize_gains_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random W_q and α, β, γ: at init the attention is the identity and would hide mask or ring bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LocalShapedAttention):
                m.proj_q.weight.copy_(torch.randn(m.proj_q.weight.shape, generator=g) * m.proj_q.in_features**-0.5)
                for gain in (m.alpha, m.beta, m.gamma):
                    gain.copy_(torch.rand(gain.shape, generator=g) + 0.5)


def layer(window=4, kv_heads=1, random=True):
    torch.manual_seed(0)
    attn = LocalShapedAttention(WIDTH, HEADS, kv_heads, HD, window)
    if random:
        randomize_gains_(attn)
    return attn


def positions_with_documents(t, starts):
    """segment_pos [1, t] restarting at 0 at each index in `starts`."""
    pos, p = [], 0
    for i in range(t):
        p = 0 if i in starts else p + 1
        pos.append(p)
    return torch.tensor([pos])


def dense_reference(attn, x, segment_pos):
    """Ã = α·I + β·softmax(QKᵀ/√d + M) − γ·C built densely [B, H, T, T], applied to the heads of x."""
    b, t, _ = x.shape
    q, k = attn.rope.pair(attn.proj_q(x).view(b, t, HEADS, HD).transpose(1, 2),
                          attn.proj_k(x).view(b, t, attn.kv_heads, HD).transpose(1, 2), segment_pos)
    k = k.repeat_interleave(HEADS // attn.kv_heads, 1)
    doc = torch.cumsum(segment_pos == 0, 1)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = (doc[:, :, None] == doc[:, None, :]) & (j <= i) & (i - j <= attn.window)  # [B, T, T]
    logits = (q @ k.transpose(-1, -2) / HD**0.5).masked_fill(~visible[:, None], float("-inf"))
    c = visible[:, None].float() / visible[:, None].float().sum(-1, keepdim=True)
    g = lambda p: p.view(1, -1, 1, 1)  # noqa: E731
    mat = g(attn.alpha) * torch.eye(t) + g(attn.beta) * logits.softmax(-1) - g(attn.gamma) * c
    return (mat @ x.view(b, t, HEADS, HD).transpose(1, 2)).transpose(1, 2).reshape(b, t, WIDTH), mat, visible


def test_attention_block_is_the_identity_at_init():
    attn = layer(random=False)
    x = torch.randn(2, 150, WIDTH)
    pos = positions_with_documents(150, {0, 40, 97}).expand(2, -1)
    with torch.no_grad():
        assert torch.equal(attn(x, pos), x)
    model = build_model(get_preset("griffin-sas-tiny"))
    block = model.blocks[2].temporal_block
    assert isinstance(block, LocalShapedAttention) and not block.proj_q.weight.any()
    assert all(torch.equal(p, torch.ones(4)) for p in (block.alpha, block.beta, block.gamma))
    assert all(p.no_weight_decay for p in (block.alpha, block.beta, block.gamma))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_blocked_forward_matches_the_dense_shaped_matrix(kv_heads):
    """T = 150 spans three query blocks; the dense reference's rows sum to α + β − γ over the visible window."""
    attn = layer(kv_heads=kv_heads)
    x = torch.randn(2, 150, WIDTH)
    pos = positions_with_documents(150, {0, 40, 97}).expand(2, -1)
    with torch.no_grad():
        ref, mat, _ = dense_reference(attn, x, pos)
        assert_fp32_close(attn(x, pos), ref, *LAYER, name="blocked vs dense")
    gains = (attn.alpha + attn.beta - attn.gamma).detach()
    assert_fp32_close(mat.sum(-1), gains.view(1, -1, 1).expand(2, -1, 150), terms=150, depth=2, name="row sums")


def test_rows_sum_to_alpha_and_centring_is_the_window_mean():
    attn = layer()
    pos = positions_with_documents(150, {0, 40, 97})
    c = torch.randn(WIDTH)
    with torch.no_grad():  # β = γ, a constant input: y = (row sum of Ã_h)·c_h = α_h·c_h for every token
        attn.gamma.copy_(attn.beta)
        y = attn(c.expand(1, 150, -1), pos)
        assert_fp32_close(y, (attn.alpha.repeat_interleave(HD) * c).expand(1, 150, -1), *LAYER, name="α·c")
        attn.alpha.zero_(), attn.beta.zero_(), attn.gamma.fill_(-1.0)  # y = C·x: the mean of the visible window
        x = torch.randn(1, 150, WIDTH)
        _, _, visible = dense_reference(attn, x, pos)
        mean = (visible.float() @ x) / visible.sum(-1, keepdim=True)
        assert_fp32_close(attn(x, pos), mean, *LAYER, name="window mean")


def test_no_leakage_across_documents_or_beyond_the_window():
    attn = layer(window=4)
    pos = positions_with_documents(90, {0, 30, 33})
    x = torch.randn(1, 90, WIDTH, requires_grad=True)
    _, _, visible = dense_reference(attn, x.detach(), pos)
    for i in (2, 31, 35, 70, 89):
        (grad,) = torch.autograd.grad(attn(x, pos)[0, i].square().sum(), x)
        reached = grad[0].abs().sum(-1) > 0
        assert torch.equal(reached, visible[0, i]), i


def test_scores_grow_with_the_window_not_the_length(monkeypatch):
    attn, seen = layer(window=8), []
    matrix = shaped_attention.shaped_attention_matrix

    def spy(logits, *args):
        seen.append(logits.shape[-1])
        return matrix(logits, *args)

    monkeypatch.setattr(shaped_attention, "shaped_attention_matrix", spy)
    with torch.no_grad():
        attn(torch.randn(1, 700, WIDTH), torch.arange(700)[None])
    assert max(seen) <= 8 + attn.block < 700 and len(seen) == -(-700 // attn.block)


def tiny(window=4, seed=0):
    """griffin-sas-tiny with a small window (the ring wraps), random W_q, gains, norm scales and biases."""
    torch.manual_seed(seed)
    model = build_model(get_preset("griffin-sas-tiny").replace(attention_window=window, embed_scale_sqrt=True,
                                                               logit_softcap=30.0))
    randomize_(model, torch.Generator().manual_seed(seed))
    randomize_gains_(model, seed)
    return model.eval()


def test_decode_and_chunked_continuation_match_the_full_forward():
    model = tiny()
    tokens = torch.randint(0, 257, (2, 40))
    positions = torch.cat([torch.arange(23), torch.arange(17)]).expand(2, -1)  # a document starts at 23
    with torch.no_grad():
        full = model(tokens, positions)
        for chunks in ((3, 9, 1, 11, 1, 15), (1,) * 40):  # chunks shorter and longer than the window; token by token
            cache, pieces, start = model.new_cache(2), [], 0
            for n in chunks:
                pieces.append(model(tokens[:, start:start + n], positions[:, start:start + n], cache))
                start += n
            assert_fp32_close(torch.cat(pieces, 1), full, *model_reductions(model.config, 40), name=str(chunks))
    assert cache.layers[2].v.shape == (2, 4, 4, 16)  # the inputs x, split into all heads, are the stored values


def test_left_padded_batch_matches_single_rows():
    model = tiny()
    prompts = [[5, 9, 11, 200, 3, 7, 8], [42], [1, 2, 3, 4]]
    width = max(map(len, prompts))
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    positions = torch.stack([torch.arange(width) - (width - len(p)) for p in prompts]).clamp(min=-1)
    with torch.no_grad():
        cache = model.new_cache(3)
        batched = [model(tokens, positions, cache)[:, -1]] + [model(torch.tensor([[7], [8], [9]]), cache=cache)[:, -1]]
        for row, prompt in enumerate(prompts):
            single_cache = model.new_cache(1)
            first = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], single_cache)[:, -1]
            second = model(torch.tensor([[7 + row]]), cache=single_cache)[:, -1]
            assert_fp32_close(batched[0][row], first[0], *model_reductions(model.config, width), name=f"row {row}")
            assert_fp32_close(batched[1][row], second[0], *model_reductions(model.config, width + 1), name=f"row {row}")
    greedy = torch.stack(list(generate_tokens(model, prompts, 6, Sampling(temperature=0))), 1)
    for row, prompt in enumerate(prompts):
        assert torch.equal(greedy[row], torch.stack(list(generate_tokens(model, [prompt], 6,
                                                                         Sampling(temperature=0))), 1)[0])


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model(get_preset("griffin-sas-tiny")).train()
    tokens = torch.randint(0, 257, (4, 33))
    opt = torch.optim.AdamW(model.weight_decay_groups(0.1), 3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert model.blocks[2].temporal_block.proj_q.weight.any()  # W_q leaves 0: the attention learns


def test_presets_build_on_meta_and_are_matched_to_griffin():
    for size in ("tiny", "small"):
        plain, sas = get_preset(f"griffin-{size}"), get_preset(f"griffin-sas-{size}")
        assert sas.replace(name=plain.name, attention_kind="mqa") == plain
        m_plain, m_sas = build_model(plain, device="meta"), build_model(sas, device="meta")
        d, hd, h = sas.width, sas.dim_per_head, sas.n_heads
        n_attn = sum(b.kind == "attention" for b in m_sas.blocks)
        assert m_plain.num_params() - m_sas.num_params() == n_attn * (d * hd + d * d + d - 3 * h)
    with pytest.raises(ConfigError, match="attention_kind"):
        get_preset("griffin-sas-tiny").replace(attention_kind="linear")
    with pytest.raises(ConfigError, match="n_heads·head_dim"):
        get_preset("griffin-sas-tiny").replace(head_dim=8)


def test_config_round_trip_keeps_the_attention_kind(tmp_path):
    get_preset("griffin-sas-tiny").save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json").attention_kind == "shaped"
