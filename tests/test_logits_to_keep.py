"""`LanguageModel.forward(..., logits_to_keep=k)`: only the last k positions' logits, equal to those columns of the
full forward, with and without a cache, for every architecture; prefill and the serve engine ask for one."""

import pytest
import torch

from kitelm.generate import left_pad, prefill
from kitelm.models import build_model
from kitelm.presets import get_preset
from numerics import assert_fp32_close

PRESETS = ["transformer-tiny", "griffin-tiny", "hawk-tiny", "griffin-sas-tiny", "sas-p-small"]


def _model(preset):
    torch.manual_seed(0)
    return build_model(get_preset(preset)).eval()


def _close(kept, full, config, name):
    # The blocks compute the same values either way; only the final norm and the head run on fewer rows (possibly
    # another kernel: ≤ 8 rows take the decode kernels): two chained reductions of ≤ width terms, then the softcap.
    assert_fp32_close(kept, full, config.width, depth=2, name=name)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("cached", [False, True])
def test_last_logits_equal_the_full_forward(preset, cached):
    model = _model(preset)
    g = torch.Generator().manual_seed(1)
    tokens, positions = left_pad([torch.randint(1, 200, (n,), generator=g).tolist() for n in (37, 20)])
    t = tokens.shape[1]
    with torch.inference_mode():
        cache_full = model.new_cache(2, max_len=t + 4) if cached else None
        full = model(tokens, positions, cache_full)
        assert full.shape == (2, t, model.config.vocab_size)
        for k in (1, 3, t, t + 5):  # k ≥ T keeps every position
            cache = model.new_cache(2, max_len=t + 4) if cached else None
            kept = model(tokens, positions, cache, logits_to_keep=k)
            assert kept.shape == (2, min(k, t), model.config.vocab_size) and kept.dtype == torch.float32
            _close(kept, full[:, -min(k, t):], model.config, f"{preset} keep {k}")
            if cached:  # the cache is filled exactly as by the full forward
                assert torch.equal(cache.next_pos, cache_full.next_pos)
                for a, b in zip(cache.layers, cache_full.layers):
                    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
                        assert torch.equal(x, y), f"{preset} keep {k}: cache buffer {name} differs"
        if cached:  # and decoding continues from it alike
            nxt = full[:, -1].argmax(-1, keepdim=True)
            _close(model(nxt, cache=cache, logits_to_keep=1), model(nxt, cache=cache_full), model.config,
                   f"{preset} next step")


def test_zero_keeps_every_position_and_negative_is_refused():
    model = _model("griffin-tiny")
    ids = torch.randint(0, 200, (1, 9))
    with torch.inference_mode():
        assert torch.equal(model(ids, logits_to_keep=0), model(ids))
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, logits_to_keep=-1)


def test_prefill_computes_only_the_last_position():
    """prefill returns [B, V] and never runs the head on more than one row per pass."""
    model = _model("griffin-tiny")
    rows = []
    original = model.logits
    model.logits = lambda x: rows.append(x.shape[1]) or original(x)
    tokens, positions = left_pad([list(range(1, 30)), list(range(5, 20))])
    with torch.inference_mode():
        last = prefill(model, tokens, positions, model.new_cache(2, max_len=32), chunk=8)
        model.logits = original
        full = model(tokens, positions, model.new_cache(2, max_len=32))[:, -1]
    assert rows == [1, 1, 1, 1] and last.shape == (2, model.config.vocab_size)
    _close(last, full, model.config, "prefill vs full forward")
