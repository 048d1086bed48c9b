"""Simplified transformer blocks (He & Hofmann 2023): the paper's claims at init, parameter arithmetic, decoding."""

from __future__ import annotations

import pytest
import torch

from kitelm.config import ModelConfig
from kitelm.presets import get_preset
from kitelm.errors import ConfigError, KitelmError
from kitelm.generate import left_pad
from kitelm.layers.shaped_attention import shaped_attention_matrix
from kitelm.models import build_model
from kitelm.train.trainer import lm_loss
from numerics import assert_fp32_close, fp32_tolerance, model_reductions

VARIANTS = ["preln", "parallel", "vskipinit", "sas", "sas-p", "sas-p-nonorm"]
TINY = dict(width=64, n_layers=3, n_heads=4, max_seq_len=64, vocab_size=97)


def tiny(variant: str, **changes) -> ModelConfig:
    """The `<variant>-small` preset shrunk for fast tests."""
    return get_preset(f"{variant}-small").replace(**{**TINY, **changes})


def perturbed(config: ModelConfig, seed: int = 0):
    """A model whose every parameter is moved off its init (W^Q = 0 and unit gains would hide bugs)."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("variant", ["sas", "sas-p", "sas-p-nonorm"])
def test_attention_sub_block_is_identity_of_normalised_input_at_init(variant):
    torch.manual_seed(0)
    model = build_model(tiny(variant))
    x = torch.randn(2, 10, 64)
    positions = torch.arange(10).expand(2, 10)
    for block in model.blocks:
        h = block.norm1(x)
        assert torch.equal(block.attn(h, positions), h)  # explicit matrix path: exactly the identity
        # SDPA + running-mean path: α·h + β·(softmax·h) − γ·(mean of h) cancels only up to rounding of 10-key sums
        assert_fp32_close(block.attn(h, None), h, terms=10, depth=2, name="SDPA path")


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_sas_and_sas_p_give_equal_logits_at_init(eps):
    """Sec. 4.3: with the same weights both compute Norm(x) + β_FF·MLP(Norm(x)) at init; SAS's Norm₂(Norm₁(x)) equals
    Norm₁(x) up to RMSNorm's eps (a relative change ≤ eps/2 per norm, one per layer), the only difference besides
    rounding."""
    torch.manual_seed(0)
    sas = build_model(tiny("sas", norm_eps=eps))
    sas_p = build_model(tiny("sas-p", norm_eps=eps))
    shared = {k: v for k, v in sas.state_dict().items() if k in sas_p.state_dict()}
    sas_p.load_state_dict(shared)
    ids = torch.randint(0, 97, (2, 20))
    a, b = sas(ids), sas_p(ids)
    terms, depth = model_reductions(sas.config, 20)
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= (fp32_tolerance(terms, depth) + sas.config.n_layers * eps) * scale


def test_shaped_attention_rows_sum_to_alpha_and_centring_is_uniform_over_visible_keys():
    torch.manual_seed(0)
    h, t = 3, 6
    logits = torch.randn(2, h, t, t)
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3]])  # row 2 is left-padded
    slots = torch.arange(t)
    mask = ((slots[None, :] <= slots[:, None]) & (k_pos[:, None, :] >= 0)) | (slots[None, :] == slots[:, None])
    mask = mask.unsqueeze(1)
    identity = slots[None, :] == slots[:, None]
    alpha, beta, gamma = torch.rand(h) + 0.5, torch.rand(h), torch.rand(h)
    shaped = shaped_attention_matrix(logits, mask, identity, alpha, beta, gamma)
    row_sums = alpha.view(1, h, 1).expand(2, h, t) + (beta - gamma).view(1, h, 1)
    assert_fp32_close(shaped.sum(-1), row_sums, terms=t, depth=2, name="row sums")  # softmax, then the row sum
    ones = torch.ones(h)
    shaped = shaped_attention_matrix(logits, mask, identity, alpha, ones, ones)
    assert_fp32_close(shaped.sum(-1), alpha.view(1, h, 1).expand(2, h, t), terms=t, depth=2, name="row sums, β = γ")
    assert (shaped.masked_fill(mask, 0) == 0).all()  # nothing leaks to future or padded keys
    # Zero logits (W^Q = 0 at init) and β = γ: A = C, so the matrix is exactly α·I.
    at_init = shaped_attention_matrix(torch.zeros(2, h, t, t), mask, identity, ones, ones, ones)
    assert torch.equal(at_init, identity.float().expand(2, h, t, t))
    # α = β = 0, γ = −1 isolates C: C_ij = 1/i for j ≤ i (1-indexed) without padding.
    centred = shaped_attention_matrix(torch.zeros(1, 1, t, t), mask[:1], identity, torch.zeros(1), torch.zeros(1),
                                      -torch.ones(1))
    assert_fp32_close(centred[0, 0], torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None], terms=t,
                      name="centring matrix")


@pytest.mark.parametrize("matrix", ["shaped", "skipinit", "softmax"])
def test_training_path_matches_explicit_shaped_matrix_in_outputs_and_gradients(matrix):
    """The training path (SDPA + running mean of V) against the materialised α·I + β·A − γ·C used with caches."""
    attn = perturbed(tiny("sas", attn_matrix=matrix, allow_unstable_blocks=True)).blocks[0].attn
    x = torch.randn(2, 9, 64, requires_grad=True)
    grads = []
    for positions in (None, torch.arange(9).expand(2, 9)):
        out = attn(x, positions)
        grads.append((out, *torch.autograd.grad((out * torch.linspace(-1, 1, 64)).sum(), [x, *attn.parameters()])))
    for fast, explicit in zip(*grads):  # one attention layer (5 chained reductions ≤ 64 terms), forward + backward
        assert_fp32_close(fast, explicit, terms=64, depth=10, name="SDPA vs explicit matrix")


def test_paper_size_parameter_counts_match_the_reference_arithmetic():
    """Vocab 50,000, 1,024 learned positions, tied head: 166.6M Pre-LN vs 146.0M SAS, −16.2% non-embedding
    (Pre-LN 18·(12d² + 2d (Q/K bias) + 2d (norms)) + LayerNorm ln_f; SAS 18·(10d² + 4d + 36 + 3) + d² + 2)."""
    preln = build_model(get_preset("preln-paper"), device="meta")
    sas = build_model(get_preset("sas-paper"), device="meta")
    sas_p = build_model(get_preset("sas-p-paper"), device="meta")
    assert preln.num_params() == 166_645_248
    assert sas.num_params() == 146_002_112
    assert round(preln.num_params() / 1e6, 1) == 166.6 and round(sas.num_params() / 1e6, 1) == 146.0
    saving = 1 - sas.num_params(non_embedding=True) / preln.num_params(non_embedding=True)
    assert round(100 * saving, 1) == 16.2
    # SAS-P drops the second norm and the MLP skip gain α_FF of every block.
    assert sas.num_params() - sas_p.num_params() == 18 * (768 + 1)


def test_gains_are_excluded_from_weight_decay():
    model = build_model(tiny("sas"))
    decay, no_decay = (set(map(id, g["params"])) for g in model.weight_decay_groups(0.1))
    names = dict(model.named_parameters())
    gains = [n for n in names if n.rsplit(".", 1)[-1] in ("alpha", "beta", "gamma", "beta_sa", "alpha_ff", "beta_ff")]
    assert len(gains) == 3 * 3 + 3 * 3 + 2  # per block α, β, γ and β_SA, α_FF, β_FF; first-layer α_V, β_V
    assert all(id(names[n]) in no_decay for n in gains)
    assert id(names["blocks.0.attn.v.weight"]) in decay  # ΔW^V is decayed (App. C)
    assert id(names["embed.weight"]) in decay and id(names["pos_embed.weight"]) in decay


def _decode_cases():
    cases = [tiny(v) for v in VARIANTS]
    cases.append(tiny("sas", attn_matrix="skipinit"))
    cases.append(tiny("sas-p", pos_embedding="rope"))
    cases.append(tiny("preln", pos_embedding="rope", final_norm="rms", qk_bias=False))
    cases.append(tiny("sas", mlp_skip=False, allow_unstable_blocks=True))
    return cases


@pytest.mark.parametrize("config", _decode_cases(), ids=lambda c: f"{c.name}-{c.attn_matrix}-{c.pos_embedding}")
def test_decode_with_kv_cache_matches_full_forward(config):
    model = perturbed(config)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, max_len=12)
        steps = [model(ids[:, :7], cache=cache)]  # prefill, then one token at a time
        steps += [model(ids[:, i:i + 1], cache=cache) for i in range(7, 12)]
    assert_fp32_close(torch.cat(steps, 1), full, *model_reductions(config, 12), name="cached vs full")


@pytest.mark.parametrize("variant", ["preln", "sas", "sas-p-nonorm"])
def test_left_padded_batch_decodes_like_each_prompt_alone(variant):
    model = perturbed(tiny(variant))
    prompts = [[5, 9, 2, 7, 1], [3, 8]]
    continuation = torch.tensor([[4, 6, 11], [12, 10, 13]])
    tokens, positions = left_pad(prompts)
    with torch.no_grad():
        cache = model.new_cache(2, max_len=8)
        batched = [model(tokens, positions, cache)[:, -1:]]
        batched += [model(continuation[:, i:i + 1], cache=cache) for i in range(3)]
        batched = torch.cat(batched, 1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + continuation[row].tolist()]))[0, len(prompt) - 1:]
            assert_fp32_close(batched[row], alone, *model_reductions(model.config, 8), name=f"row {row}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_few_training_steps_lower_the_loss(variant):
    torch.manual_seed(0)
    model = build_model(get_preset(f"{variant}-small").replace(vocab_size=64))
    opt = torch.optim.AdamW(model.weight_decay_groups(0.1), lr=1e-3)
    batch = (torch.arange(33)[None, :] * torch.arange(1, 5)[:, None]) % 64  # 4 periodic sequences of 32 (+1) tokens
    losses = []
    for _ in range(6):
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("changes, cited", [
    (dict(attn_skip=False, attn_matrix="softmax"), "rank collapse"),
    (dict(mlp_skip=False), "Fig. 25"),
    (dict(attn_skip=False, attn_matrix="shaped", mlp_gain_init=1.0), "down-weighted MLP"),
    (dict(parallel_block=True, attn_skip=True, mlp_skip=False), "one skip"),
    (dict(n_kv_heads=1), "multi-head"),
])
def test_unstable_or_inconsistent_combinations_are_rejected_with_the_papers_reason(changes, cited):
    with pytest.raises(ConfigError, match=cited):
        get_preset("preln-small").replace(**changes)


def test_unstable_combinations_train_only_behind_the_explicit_flag():
    config = get_preset("sas-small").replace(mlp_skip=False, allow_unstable_blocks=True)
    assert build_model(config, device="meta").blocks[0].mlp_skip is False


def test_learned_positions_beyond_the_table_raise_a_clear_error():
    model = build_model(tiny("sas"))
    with pytest.raises(KitelmError, match="learned positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
