"""Token datasets: a corpus tokenized once into `train.bin` / `val.bin` (uint16 or uint32) and memory-mapped, plus
the deterministic window sampler the trainer draws batches from.

Each document is followed by the end-of-text token. Batches are non-overlapping windows of `seq_len + 1` tokens,
visited in a fresh random order every epoch: sample k of the run is window `perm_{k // N}[k mod N]`, so the
data position is just the step number and resuming needs no other state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .corpus import Corpus
from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, parse_tokenizer_spec


def cache_root() -> Path:
    return Path(os.environ.get("KITELM_CACHE", Path.home() / ".cache" / "kitelm"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_tokenizer(spec: str, corpus: Corpus, log=lambda msg: None) -> Tokenizer:
    """`byte`, or a BPE trained on the corpus's train split and cached by (corpus hash, vocab size). `log` hears
    when the corpus was too small for the requested vocabulary."""
    kind, size = parse_tokenizer_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    folder = cache_root() / "tokenizers" / f"bpe{size}-{corpus.fingerprint['sha256'][:16]}"
    if (folder / TOKENIZER_FILE).exists():
        tok = load_tokenizer(folder)
    else:
        tok = _train_bpe(corpus, size, folder)
    if tok.vocab_size < size:
        log(f"note: the BPE tokenizer has {tok.vocab_size:,} tokens, not the {size:,} requested: the training split "
            "has no more distinct merges; a larger corpus (--data) gives a larger vocabulary")
    return tok


def _train_bpe(corpus: Corpus, size: int, folder: Path) -> Tokenizer:
    tok = BPETokenizer.train((d.text for d in corpus.train), size)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    tok.save(tmp)
    os.replace(tmp / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    tmp.rmdir()
    return tok


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenate the documents' token ids, each followed by end-of-text."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    if isinstance(tokenizer, ByteTokenizer):
        encoded = (np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts)
    elif hasattr(tokenizer, "encode_batch"):
        encoded = map(np.asarray, tokenizer.encode_batch(texts))
    else:
        encoded = (np.asarray(tokenizer.encode(t)) for t in texts)
    eot = np.array([tokenizer.eos_id], dtype=dtype)
    return np.concatenate([part for ids in encoded for part in (ids.astype(dtype), eot)])


@dataclass
class TokenData:
    train: np.ndarray  # memory-mapped token ids
    validation: np.ndarray
    folder: Path


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer) -> TokenData:
    """Tokenize both splits once into the cache (keyed by corpus and tokenizer hashes) and memory-map them."""
    tok_id = hashlib.sha256(tokenizer.name.encode())
    if isinstance(tokenizer, BPETokenizer):
        tok_id.update(tokenizer.hf.to_str().encode())
    folder = cache_root() / "tokens" / f"{corpus.fingerprint['sha256'][:16]}-{tok_id.hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        dtypes = {}
        for split, docs in (("train", corpus.train), ("val", corpus.validation)):
            ids = encode_documents(tokenizer, [d.text for d in docs])
            _atomic_write_bytes(folder / f"{split}.bin", ids.tobytes())
            dtypes[split] = str(ids.dtype)
        meta = {"tokenizer": tokenizer.name, "fingerprint": corpus.fingerprint, "dtype": dtypes["train"]}
        _atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    dtype = json.loads(meta_path.read_text())["dtype"]
    return TokenData(np.memmap(folder / "train.bin", dtype=dtype, mode="r"),
                     np.memmap(folder / "val.bin", dtype=dtype, mode="r"), folder)


class WindowSampler:
    """Deterministic batches of `[batch, seq_len + 1]` token windows from a memory-mapped stream.

    `batch(step, micro, rank, world)`: the global batch of `step` holds `micro_batch · accum · world` samples;
    micro-batch `micro` of rank `rank` takes a disjoint slice of it, so every window is seen once per epoch
    across all ranks and micro-batches.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, accum: int = 1, world: int = 1,
                 seed: int = 0):
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.accum, self.world, self.seed = accum, world, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the training split holds {len(tokens)} tokens, fewer than one window of "
                            f"seq_len+1={seq_len + 1}; use more data or a shorter --seq-len")
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.world

    def _window(self, k: int) -> int:
        epoch = k // self.n_windows
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g).numpy(), epoch
        return int(self._perm[k % self.n_windows])

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int | None = None) -> torch.Tensor:
        first = step * self.global_batch + (micro * (world or self.world) + rank) * self.micro_batch
        rows = [self.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1]
                for w in map(self._window, range(first, first + self.micro_batch))]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def validation_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows `[N, seq_len + 1]` covering the first `max_tokens` validation tokens."""
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    count = n // seq_len
    if count < 1:
        raise DataError(f"the validation split holds {len(tokens)} tokens, fewer than one window of {seq_len + 1} "
                        "(the context length + 1); use more data (--data), or train with a shorter --seq-len")
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[: count * seq_len + 1])[idx].astype(np.int64))
