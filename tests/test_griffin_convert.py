"""Loading RecurrentGemma checkpoints made locally from random tiny models: the official torch state dict, a sharded
Hugging Face folder, `kitelm convert`, SentencePiece tokenizers, and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

import kitelm
from griffin_reference import one_thread, reference_griffin
from kitelm.cli import main
from kitelm.presets import get_preset
from kitelm.convert import load_model
from kitelm.errors import CheckpointError, KitelmError
from kitelm.models import build_model
from numerics import assert_fp32_close, model_reductions

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
VOCAB = 97


@pytest.fixture(scope="module")
def sentencepiece_file(tmp_path_factory):
    """A tiny SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), trained in-test."""
    import sentencepiece as spm

    words = ["alpha", "beta", "gamma", "delta", "griffin", "hawk", "state", "window", "token", "scan"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=32,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory, sentencepiece_file):
    """An official-format checkpoint: `torch.save(Griffin.state_dict())` + tokenizer.model beside it."""
    ref = reference_griffin(window=2048, vocab=VOCAB)  # the state dict holds no window: RecurrentGemma's 2048
    folder = tmp_path_factory.mktemp("official")
    torch.save(ref.state_dict(), folder / "griffin.pt")
    shutil.copy(sentencepiece_file, folder / "tokenizer.model")
    return ref, folder / "griffin.pt"


def reference_logits(ref, tokens):
    with torch.no_grad():
        return ref(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), return_cache=False)[0]


def test_load_official_state_dict_matches_reference(official):
    ref, path = official
    lm = kitelm.load(path)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert_fp32_close(lm.model(tokens), reference_logits(ref, tokens), *model_reductions(lm.config, 12))
    assert lm.config.block_pattern == "RRA" and lm.config.lru_width == 64 and lm.config.embed_scale_sqrt
    assert lm.encode("griffin state")[0] == 2  # BOS first, as the official sampler (GDM torch/sampler.py:195-197)
    assert lm.tokenizer.eos_id == 1 and lm.tokenizer.decode(lm.encode("hawk scan")[1:]) == "hawk scan"


def test_convert_cli_writes_a_checkpoint_that_loads_and_generates(official, tmp_path, capsys):
    ref, path = official
    out = tmp_path / "converted"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.model", "manifest.json"}
    lm = kitelm.load(out)
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert_fp32_close(lm.model(tokens), reference_logits(ref, tokens), *model_reductions(lm.config, 9))
    assert main(["generate", "--checkpoint", str(out), "--prompt", "alpha beta", "gamma", "--max-new-tokens", "4",
                 "--greedy"]) == 0
    assert capsys.readouterr().out.count("--- [") == 2


def test_sharded_hf_folder_matches_transformers(tmp_path_factory, sentencepiece_file):
    import transformers
    config = transformers.RecurrentGemmaConfig(
        num_hidden_layers=4, vocab_size=VOCAB, hidden_size=48, intermediate_size=2 * 96, num_attention_heads=4,
        num_key_value_heads=1, lru_width=64, attention_window_size=16, conv1d_width=4, logits_soft_cap=30.0,
        block_types=["recurrent", "recurrent", "attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.RecurrentGemmaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.copy_(0.1 * torch.randn(p.shape))
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").exists()
    shutil.copy(sentencepiece_file, folder / "tokenizer.model")
    out = tmp_path_factory.mktemp("converted") / "rg"
    assert main(["convert", str(folder), "--out", str(out)]) == 0
    tokens = torch.randint(0, VOCAB, (2, 16))  # T ≤ window: HF's window is one key shorter (layers/local_attention.py)
    with torch.no_grad():
        expected = hf(tokens).logits
        for lm in (kitelm.load(folder), kitelm.load(out)):
            assert_fp32_close(lm.model(tokens), expected, *model_reductions(lm.config, 16), name=str(lm.path))


# ------------------------------------------------------------------------------------------------- bad input
def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        kitelm.load(tmp_path / "hf")
    torch.save(build_model(get_preset("transformer-tiny")).state_dict(), tmp_path / "transformer.pt")
    with pytest.raises(CheckpointError, match="not an official RecurrentGemma"):
        load_model(tmp_path / "transformer.pt")


def test_mis_shaped_and_missing_tensors_are_listed(official, tmp_path):
    ref, _ = official
    state = ref.state_dict()
    del state["blocks.1.recurrent_block.linear_x.bias"]
    state["blocks.0.recurrent_block.conv_1d.w"] = torch.zeros(3, 64)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pt")
    message = str(err.value)
    assert "blocks.1.temporal_block.linear_x.bias" in message and "conv_1d.w: (3, 64) vs (4, 64)" in message
    assert "\n" not in message


def test_widths_that_do_not_divide_are_refused(tmp_path):
    config = {"model_type": "recurrent_gemma", "vocab_size": 32, "hidden_size": 48, "intermediate_size": 96,
              "num_attention_heads": 5, "num_hidden_layers": 2, "lru_width": 48, "block_types": ["recurrent"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KitelmError, match="does not divide"):
        kitelm.load(tmp_path)


def test_cli_refuses_bad_tokenizer_and_writes_nothing(official, tmp_path, capsys):
    _, path = official
    (tmp_path / "bad.model").write_text("this is not a sentencepiece model")
    out = tmp_path / "out"
    assert main(["convert", str(path), "--out", str(out), "--tokenizer", str(tmp_path / "bad.model")]) == 2
    err = capsys.readouterr().err
    assert "not a SentencePiece model" in err and err.count("\n") == 1
    assert not out.exists() and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
