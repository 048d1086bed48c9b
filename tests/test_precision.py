"""The compute dtype follows the machine: `auto` is bf16 where the CPU has native bf16 (mocked flags), float32
elsewhere; bf16 autocast keeps fp32 weights, loss and recurrence; runs record their dtype and CPU."""

from __future__ import annotations

import json

import pytest
import torch

from kitelm import precision
from kitelm.errors import ConfigError
from kitelm.evaluation import lm_loss
from kitelm.models import build_model
from kitelm.presets import get_preset
from kitelm.train.trainer import TrainConfig, Trainer

BF16_UNIT_ROUNDOFF = 2.0**-9  # bf16 keeps 8 significant bits: each rounding is off by at most 2^-9 relative
NATIVE_BF16 = precision.native_bf16  # the real one (conftest makes `auto` mean float32 in every other test)
bf16_kernels = pytest.mark.skipif(precision.bf16_kernels_capped(), reason="ATEN_CPU_CAPABILITY caps torch below "
                                  "AVX-512 on a bf16 CPU: torch's bf16 attention fails there (resolve_dtype refuses)")


@pytest.mark.parametrize("flags, capability, expected", [
    ({"avx2", "fma"}, "AVX2", torch.float32),  # AVX2-only (Zen3): no bf16 GEMM path
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", torch.bfloat16),  # AVX-512 with BF16 (Zen4/5, Cooper Lake)
    ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, "AVX512", torch.bfloat16),  # AMX (Sapphire Rapids)
    ({"avx2", "avx512f"}, "AVX512", torch.float32),  # AVX-512 without BF16 (Skylake-X)
    ({"avx2", "avx512f", "amx_bf16"}, "AVX2", torch.float32),  # ATEN_CPU_CAPABILITY=avx2: torch lacks bf16 kernels
    (set(), "DEFAULT", torch.float32),  # flags unknown (not Linux)
])
def test_auto_picks_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, flags, capability, expected):
    monkeypatch.setattr(precision, "native_bf16", NATIVE_BF16)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert precision.resolve_dtype("auto") == expected
    assert precision.resolve_dtype("float32") == torch.float32
    if not precision.bf16_kernels_capped():  # refused there (the next test)
        assert precision.resolve_dtype("bfloat16") == torch.bfloat16
    assert precision.inference_dtype("auto") == torch.float32  # CPU decoding runs the fp32 kernels


def test_explicit_bf16_is_refused_where_torch_kernels_are_capped_below_avx512(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(ConfigError, match="unset ATEN_CPU_CAPABILITY or use --dtype float32"):
        precision.resolve_dtype("bfloat16")


def test_float16_and_unknown_dtypes_are_refused_on_cpu():
    with pytest.raises(ConfigError, match="float16 is refused on a CPU"):
        precision.resolve_dtype("float16")
    with pytest.raises(ConfigError, match="unknown"):
        precision.resolve_dtype("int3")
    with pytest.raises(ConfigError, match="dtype='float16'"):
        TrainConfig(dtype="float16")


@bf16_kernels
@pytest.mark.parametrize("name", ["transformer-tiny", "griffin-tiny"])
def test_bf16_autocast_logits_match_fp32_within_bf16_rounding(name):
    """Bound: each layer rounds its matmul inputs and outputs to bf16 (2 roundings of relative size 2^-9); errors add
    over the residual stream's layers, plus the embedding and head: ≤ 2·(layers + 2)·2^-9 · (max|logit| + 1)."""
    model = build_model(get_preset(name)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        exact = model(ids)
        with precision.autocast(torch.bfloat16):
            low = model(ids)
    assert low.dtype == torch.float32  # logits (and so the loss) stay fp32
    bound = 2 * (model.config.n_layers + 2) * BF16_UNIT_ROUNDOFF * (exact.abs().max().item() + 1)
    assert (low - exact).abs().max().item() <= bound
    assert (low - exact).abs().max().item() > 0  # autocast really ran the matmuls in bf16


@bf16_kernels
def test_rglru_state_stays_float32_under_autocast():
    model = build_model(get_preset("griffin-tiny")).eval()
    cache = model.new_cache(2, max_len=16)
    with torch.no_grad(), precision.autocast(torch.bfloat16):
        model(torch.randint(0, 100, (2, 16)), torch.arange(16).expand(2, -1), cache)
    recurrent = [s for s in cache.layers if hasattr(s, "h")]
    assert recurrent and all(s.h.dtype == torch.float32 for s in recurrent)


@bf16_kernels
def test_bf16_training_keeps_fp32_weights_and_records_dtype_and_cpu(corpus_dir, tmp_path):
    tc = TrainConfig(out_dir=str(tmp_path), data=str(corpus_dir), steps=2, batch_size=4, seq_len=32, eval_every=2,
                     eval_tokens=256, save_every=2, dtype="bfloat16")
    trainer = Trainer(get_preset("transformer-tiny"), tc)
    trainer.train()
    trainer.release()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point())
    for record in (tmp_path / "run.json", tmp_path / "checkpoints" / "step-00000002" / "meta.json"):
        meta = json.loads(record.read_text())
        assert meta["dtype"] == "bfloat16" and meta["machine"]["cpu"] and "cpu_flags" in meta["machine"]


@bf16_kernels
def test_bf16_and_fp32_losses_agree_at_init():
    """The loss is a mean of fp32 log-softmaxes of the logits above; its bf16 error is at most twice the logits'
    (log-softmax is 2-Lipschitz in the max norm)."""
    model = build_model(get_preset("transformer-tiny"))
    batch = torch.randint(0, model.config.vocab_size, (4, 33))
    with torch.no_grad():
        exact = lm_loss(model, batch).item()
        with precision.autocast(torch.bfloat16):
            low = lm_loss(model, batch).item()
        logit_scale = model(batch[:, :-1]).abs().max().item()
    assert abs(low - exact) <= 2 * 2 * (model.config.n_layers + 2) * BF16_UNIT_ROUNDOFF * (logit_scale + 1)
