"""Corpora, tokenizers and the window sampler."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kitelm.data.corpus import is_validation, load_corpus, load_stdlib_corpus, split_documents, Document
from kitelm.data.dataset import WindowSampler, build_tokenizer, encode_documents, prepare_tokens
from kitelm.data.tokenizer import ByteTokenizer, load_tokenizer
from kitelm.errors import ConfigError, DataError, KitelmError


@given(st.binary(max_size=300))
def test_byte_tokenizer_round_trips_any_bytes(data):
    tok = ByteTokenizer()
    assert tok.decode_bytes(list(data)) == data  # token i < 256 is byte i


@given(st.text(max_size=200))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    try:
        ids = tok.encode(text)
    except KitelmError:  # lone surrogates are not UTF-8: a clear error, never silent corruption
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert tok.decode(ids) == text and all(0 <= i < 256 for i in ids)


@pytest.fixture(scope="module")
def bpe(corpus_dir, tmp_path_factory):
    return build_tokenizer("bpe:600", load_corpus(str(corpus_dir)))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=120))
def test_bpe_round_trips_any_text(bpe, text):
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_saves_and_loads(bpe, tmp_path):
    bpe.save(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "def total(items):\n    return sum(items)  # ünïcode ✓"
    assert again.encode(text) == bpe.encode(text) and again.vocab_size == bpe.vocab_size <= 600


def test_bad_tokenizer_spec():
    with pytest.raises(ConfigError, match="bpe:8192"):
        build_tokenizer("wordpiece", None)


def test_split_is_by_file_and_stable(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    assert {d.path for d in corpus.train}.isdisjoint({d.path for d in corpus.validation})
    assert all(is_validation(d.path) for d in corpus.validation)
    assert load_corpus(str(corpus_dir)).fingerprint == corpus.fingerprint
    assert corpus.fingerprint["files"] == len(list(corpus_dir.iterdir())) >= 24


def test_single_file_gets_a_validation_tail():
    corpus = split_documents("one", [Document("a.txt", "line\n" * 1000)])
    assert corpus.validation and corpus.train
    assert corpus.text("train") + corpus.text("validation") == "line\n" * 1000


def test_stdlib_corpus_skips_tests():
    corpus = load_stdlib_corpus()
    paths = [d.path for d in corpus.train + corpus.validation]
    assert len(paths) > 100 and not any("/test/" in "/" + p or "site-packages" in p for p in paths)
    assert corpus.fingerprint["python"] and len(corpus.fingerprint["sha256"]) == 64


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty UTF-8 text"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_glob_data(corpus_dir):
    corpus = load_corpus(str(corpus_dir / "module_0*.py"))
    assert corpus.fingerprint["files"] == 10


def test_tokens_are_cached_and_memory_mapped(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    tok = ByteTokenizer()
    data = prepare_tokens(corpus, tok)
    assert isinstance(data.train, np.memmap)
    assert (data.train == tok.eos_id).sum() == len(corpus.train)
    expected = encode_documents(tok, [d.text for d in corpus.train])
    assert np.array_equal(np.asarray(data.train), expected)
    assert prepare_tokens(corpus, tok).folder == data.folder


def test_sampler_sees_every_window_once_per_epoch():
    tokens = np.arange(10 * 8 + 1)
    sampler = WindowSampler(tokens, seq_len=8, micro_batch=2, accum=1, world=1, seed=3)
    starts = [int(row[0]) for step in range(5) for row in sampler.batch(step)]
    assert sorted(starts) == list(range(0, 80, 8))
    again = WindowSampler(tokens, seq_len=8, micro_batch=2, seed=3)
    assert np.array_equal(again.batch(4).numpy(), sampler.batch(4).numpy())


def test_sampler_shards_micro_batches_and_ranks():
    tokens = np.arange(12 * 4 + 1)
    full = WindowSampler(tokens, seq_len=4, micro_batch=4, seed=1)
    parts = WindowSampler(tokens, seq_len=4, micro_batch=1, accum=2, world=2, seed=1)
    rows = [parts.batch(0, micro, rank) for micro in range(2) for rank in range(2)]
    assert np.array_equal(np.concatenate(rows), full.batch(0).numpy())
