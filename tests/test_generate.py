"""The sampling engine: greedy, temperature, top-k, top-p, seeds, stopping, batching."""

import pytest
import torch

from kitelm.config import ModelConfig
from kitelm.presets import get_preset
from kitelm.generate import Sampling, generate_tokens, left_pad, prefill, sample_next
from kitelm.models import build_model
from numerics import assert_fp32_close, model_reductions


def test_top_k_only_samples_from_the_k_best():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 3.0]]).repeat(500, 1)
    picks = sample_next(logits, Sampling(temperature=2.0, top_k=2), torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(500, 1)
    picks = sample_next(logits, Sampling(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}
    assert set(sample_next(logits, Sampling(top_p=0.5), torch.Generator().manual_seed(0)).tolist()) == {0}


def _sampling_reference(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution `sample_next` draws from, in float64 with a full sort: softmax(logits / T), the tokens below
    the k-th best logit dropped, then the likeliest tokens kept until the mass before one reaches p, renormalised."""
    z = logits.double() / sampling.temperature
    if sampling.top_k is not None:
        z = z.masked_fill(z < z.topk(sampling.top_k, dim=-1).values[..., -1:], float("-inf"))
    p = z.softmax(-1)
    if sampling.top_p is not None:
        sorted_p, order = p.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        p = p.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("sampling", [Sampling(1.3), Sampling(0.8, top_k=5), Sampling(1.0, top_p=0.8),
                                      Sampling(0.6, top_k=6, top_p=0.9)])
def test_samples_follow_the_kept_distribution(sampling):
    """Frequencies of 40,000 draws against the float64 reference within 5 standard errors (a seeded generator, so
    the draws are fixed: a bound that fails means a wrong distribution, not bad luck)."""
    logits = torch.randn(1, 9, generator=torch.Generator().manual_seed(1)) * 2
    n = 40_000
    picks = sample_next(logits.repeat(n, 1), sampling, torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=9).double() / n
    p = _sampling_reference(logits, sampling)[0]
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1 / n).all()


@pytest.mark.parametrize("scale", [8.0, 0.5, 0.01])  # peaked (the window of 256), flatter and flat (the bisection)
def test_top_p_over_a_large_vocabulary_keeps_the_nucleus_of_a_full_sort(scale):
    logits = torch.randn(3, 20_000, generator=torch.Generator().manual_seed(2)) * scale
    sampling = Sampling(1.0, top_p=0.9)
    expected = _sampling_reference(logits, sampling)
    picks = torch.stack([sample_next(logits, sampling, torch.Generator().manual_seed(s)) for s in range(200)])
    assert (expected.gather(-1, picks.T) > 0).all()  # never a token outside the nucleus
    from kitelm.generate import _nucleus

    weights, ids = _nucleus(logits.softmax(-1), 0.9)
    kept = weights if ids is None else torch.zeros_like(logits).scatter(-1, ids, weights)
    assert (ids is None) == (scale < 8)  # the path each scale is meant to take
    assert torch.equal(kept > 0, expected > 0)


def test_draw_never_picks_a_zero_weight_and_rejects_nan_logits():
    from kitelm.errors import KitelmError
    from kitelm.generate import draw

    weights = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]]).repeat(5000, 1)
    assert set(draw(weights, torch.Generator().manual_seed(0)).tolist()) == {1, 3}
    with pytest.raises(KitelmError, match="not finite"):
        sample_next(torch.tensor([[0.0, float("nan"), 1.0]]), Sampling(1.0))


def test_greedy_is_argmax():
    logits = torch.randn(4, 11)
    assert torch.equal(sample_next(logits, Sampling(temperature=0)), logits.argmax(-1))


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=50, width=32, n_layers=2, n_heads=2))


def test_generation_is_reproducible_with_a_seed_and_equals_manual_greedy():
    model = _model()
    prompts = [[1, 2, 3], [4]]
    a = torch.stack(list(generate_tokens(model, prompts, 6, Sampling(0.9, top_k=10), seed=5)))
    b = torch.stack(list(generate_tokens(model, prompts, 6, Sampling(0.9, top_k=10), seed=5)))
    assert torch.equal(a, b)
    greedy = torch.stack(list(generate_tokens(model, [[1, 2, 3]], 5, Sampling(0))))[:, 0].tolist()
    seq = [1, 2, 3]
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert greedy == seq[3:]


def test_batched_rows_equal_rows_alone():
    model = _model()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    both = torch.stack(list(generate_tokens(model, prompts, 7, Sampling(0))))
    for i, p in enumerate(prompts):
        alone = torch.stack(list(generate_tokens(model, [p], 7, Sampling(0))))[:, 0]
        assert torch.equal(both[:, i], alone)


def test_stops_when_every_row_hit_the_stop_token():
    model = _model()
    model.logits = lambda x: 100 * torch.nn.functional.one_hot(torch.full(x.shape[:-1], 3), 50).float()
    steps = list(generate_tokens(model, [[1], [2, 4]], 50, Sampling(1.0), seed=0, stop_id=3))
    assert [s.tolist() for s in steps] == [[3, 3]]


@pytest.mark.parametrize("preset", ["transformer-tiny", "griffin-tiny", "hawk-tiny", "griffin-sas-tiny", "sas-p-small"])
def test_chunked_prefill_equals_one_pass_and_generates_the_same_tokens(preset):
    """Chunks of 7 over left-padded prompts of 40 and 23 tokens: chunks cross the pads, Griffin's 16-token window
    and the ring buffer's wrap-around."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 200, (n,), generator=g).tolist() for n in (40, 23)]
    tokens, positions = left_pad(prompts)
    with torch.no_grad():
        one = model(tokens, positions, model.new_cache(2, max_len=48))[:, -1]
        chunked = prefill(model, tokens, positions, model.new_cache(2, max_len=48), chunk=7)
    assert_fp32_close(chunked, one, *model_reductions(model.config, 48), name="chunked vs one pass")
    whole = torch.stack(list(generate_tokens(model, prompts, 8, Sampling(0), prefill_chunk=64)))
    assert torch.equal(torch.stack(list(generate_tokens(model, prompts, 8, Sampling(0), prefill_chunk=7))), whole)


def test_generation_runs_in_inference_mode():
    """Without it every decode step pays autograd's bookkeeping and the batch-1 C++ kernels switch off (they run only
    with grad disabled): a 3x slower decode that no output shows."""
    assert all(t.is_inference() for t in generate_tokens(_model(), [[1, 2, 3]], 3, Sampling(0)))
