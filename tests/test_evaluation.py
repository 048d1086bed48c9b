"""Bits per byte beside the compressors: xz -9 given the training split against a direct lzma computation, its cache,
and the whole-split figures computed in the same pass as the slice's."""

from __future__ import annotations

import lzma
import math

from numerics import fp32_tolerance

from kitelm import evaluation
from kitelm.data.corpus import load_corpus
from kitelm.data.dataset import cache_root, prepare_tokens, validation_windows
from kitelm.data.tokenizer import ByteTokenizer
from kitelm.evaluation import XZ_GIVEN, compressor_bits_per_byte, evaluate, evaluate_bits_per_byte, xz_size
from kitelm.models import build_model
from kitelm.presets import get_preset


def test_xz_given_train_matches_a_direct_lzma_computation(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    train, val = corpus.text("train").encode(), corpus.text("validation").encode()
    got = compressor_bits_per_byte(val, context=train)
    both, alone = len(lzma.compress(train + val, preset=9)), len(lzma.compress(train, preset=9))
    assert got[XZ_GIVEN] == 8 * (both - alone) / len(val)
    assert got["xz -9"] == 8 * len(lzma.compress(val, preset=9)) / len(val)
    # the fixture's files share their structure: having seen the training split makes the validation text cheaper
    assert got[XZ_GIVEN] < got["xz -9"]
    assert XZ_GIVEN not in compressor_bits_per_byte(val)


def test_long_inputs_are_compressed_once_and_cached_by_content(monkeypatch):
    monkeypatch.setattr(evaluation, "CACHED_XZ_BYTES", 100)
    data = bytes(range(256)) * 4
    calls = []
    real = lzma.compress
    monkeypatch.setattr(evaluation.lzma, "compress", lambda d, preset: calls.append(len(d)) or real(d, preset=preset))
    assert xz_size(data) == len(real(data, preset=9)) and calls == [len(data)]
    assert xz_size(data) == len(real(data, preset=9)) and calls == [len(data)]  # second time from the cache
    [entry] = (cache_root() / "xz9").glob("*.json")
    entry.write_text('{"bytes": 1, "xz9": 3}')  # an entry for other bytes (or corrupt) is recomputed
    assert xz_size(data) == len(real(data, preset=9)) and len(calls) == 2
    entry.write_text("not json")
    assert xz_size(data) == len(real(data, preset=9)) and len(calls) == 3
    assert xz_size(b"short") == len(real(b"short", preset=9)) and len(calls) == 4  # short inputs: never cached
    assert len(list((cache_root() / "xz9").glob("*.json"))) == 1


def test_whole_split_and_slice_come_from_one_pass(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    tok = ByteTokenizer()
    val = prepare_tokens(corpus, tok).validation
    model = build_model(get_preset("transformer-tiny").replace(vocab_size=tok.vocab_size))
    seq_len, slice_tokens = 32, 512
    assert len(val) > 2 * slice_tokens  # the slice is a strict prefix of the split
    both = evaluate_bits_per_byte(model, val, tok, seq_len, slice_tokens, batch_size=16, whole_split=True)
    alone = evaluate_bits_per_byte(model, val, tok, seq_len, slice_tokens, batch_size=16)
    whole = evaluate_bits_per_byte(model, val, tok, seq_len, None, batch_size=16)
    assert both["whole"]["tokens"] == whole["tokens"] > both["tokens"] == alone["tokens"] == slice_tokens
    for got, want in ((both, alone), (both["whole"], whole)):
        assert got["bytes"] == want["bytes"] and got["xz -9"] == want["xz -9"] and got["gzip -9"] == want["gzip -9"]
        assert got["loss"] == want["loss"]  # the same windows in the same batches (16 = the slice's windows)
    total, count = evaluate(model, validation_windows(val, seq_len, None), batch_size=16)
    # `evaluate` sums each batch's 16·32 losses in fp32, `window_losses` each window's 32 in fp64
    assert count == whole["tokens"]
    assert abs(whole["loss"] - total / count) <= fp32_tolerance(16 * seq_len) * whole["loss"]
    w = both["whole"]
    assert math.isclose(w["bits_per_byte"], w["loss"] * w["tokens"] / (math.log(2) * w["bytes"]), rel_tol=1e-12)


def test_report_skips_what_a_large_corpus_would_make_slow(corpus_dir, tmp_path, capsys, monkeypatch):
    from kitelm.cli import main

    monkeypatch.setattr(evaluation, "XZ_CONTEXT_MAX", 100)  # the fixture's training split is "too large" for xz
    monkeypatch.setattr(evaluation, "WHOLE_SPLIT_MAX_TOKENS", 100)
    assert main(["train", "--data", str(corpus_dir), "--out", str(tmp_path), "--model", "transformer-tiny", "--steps",
                 "2", "--batch-size", "4", "--seq-len", "32", "--final-eval-tokens", "512", "--no-sample"]) == 0
    out = capsys.readouterr().out
    assert "validation, first" in out and "xz -9 " in out
    assert "given the training split" not in out and "whole split" not in out
