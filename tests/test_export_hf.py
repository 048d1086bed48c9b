"""`kitelm export CHECKPOINT --format hf`: a kitelm Griffin checkpoint as a transformers RecurrentGemmaForCausalLM
folder, loaded by transformers and compared within the attention window (past it transformers' sliding mask keeps
one key fewer than the official code: docs/griffin.md §7); architectures transformers cannot represent are refused."""

from __future__ import annotations

import pytest
import torch

from kitelm.checkpoint import save_checkpoint
from kitelm.cli import main
from kitelm.config import ModelConfig
from kitelm.data.tokenizer import ByteTokenizer
from kitelm.models import build_model
from kitelm.presets import get_preset
from numerics import assert_fp32_close, model_reductions

transformers = pytest.importorskip("transformers")
WINDOW = 16


def rg_config(**changes) -> ModelConfig:
    base = dict(name="rg-tiny", arch="griffin", vocab_size=257, width=64, n_layers=3, n_heads=4, n_kv_heads=1,
                mlp="geglu", mlp_hidden=128, rope_fraction=0.5, lru_width=64, attention_window=WINDOW,
                block_pattern="RRA", embed_scale_sqrt=True, logit_softcap=30.0, max_seq_len=256)
    return ModelConfig(**{**base, **changes})


def checkpoint(tmp_path, config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # non-zero norm scales and biases, so that every tensor's mapping matters
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.copy_(0.1 * torch.randn(p.shape))
    return model, save_checkpoint(tmp_path / "run", 1, model.state_dict(), config, ByteTokenizer())


@pytest.mark.parametrize("pattern", ["RRA", "R"])
def test_exported_folder_loads_in_transformers_with_the_same_logits(tmp_path, pattern):
    config = rg_config(block_pattern=pattern)
    model, folder = checkpoint(tmp_path, config)
    out = tmp_path / "hf"
    assert main(["export", str(folder), "--format", "hf", "--out", str(out)]) == 0
    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, config.vocab_size, (2, WINDOW))  # T ≤ window
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids, use_cache=False).logits  # transformers: a Hawk cache fails
    terms, depth = model_reductions(config, WINDOW)
    assert_fp32_close(theirs, ours, terms, depth, name="logits")


def test_bf16_export_and_refusals_are_one_line(tmp_path, capsys):
    _, folder = checkpoint(tmp_path, rg_config())
    out = tmp_path / "hf16"
    assert main(["export", str(folder), "--format", "hf", "--dtype", "bfloat16", "--out", str(out)]) == 0
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    capsys.readouterr()
    for name, config in (("transformer", get_preset("transformer-mini")),
                         ("shaped", rg_config(attention_kind="shaped", n_heads=4, head_dim=16))):
        _, other = checkpoint(tmp_path / name, config)
        assert main(["export", str(other), "--format", "hf", "--out", str(tmp_path / f"x-{name}")]) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot represent" in err and "\n" not in err
        assert not (tmp_path / f"x-{name}").exists()
    assert main(["export", str(folder), "--format", "hf", "--out", str(out)]) == 2  # existing --out untouched
    assert "already exists" in capsys.readouterr().err
