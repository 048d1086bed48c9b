"""Tokenizers: byte-level (256 bytes + <|endoftext|>, nothing to train), byte-level BPE trained with HF
`tokenizers`, and a synthetic task's token ids (`TaskTokenizer`): each saves to and loads from `tokenizer.json` in a
checkpoint folder. RecurrentGemma's SentencePiece `tokenizer.model` is read as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Protocol

from ..errors import CheckpointError, ConfigError, KitelmError
from .tasks import get_task

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    name: str  # "byte", "bpe:8192", ...
    vocab_size: int
    eos_id: int  # separates documents; generation stops on it
    bos_id: int | None  # prepended to prompts when the model was trained with one

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KitelmError(f"text cannot be encoded as UTF-8 ({err.reason} at character {err.start}); "
                          "remove the invalid characters (lone surrogates) from the prompt") from None


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is <|endoftext|>. Exact round trip for any byte string."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    bos_id = None

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if i < 256)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps({"kitelm_tokenizer": "byte"}) + "\n")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) from HF `tokenizers`; <|endoftext|> is a special token."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eos_id = hf_tokenizer.token_to_id(EOT)
        self.bos_id = None
        self.name = f"bpe:{self.vocab_size}"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.hf.save(str(Path(directory) / TOKENIZER_FILE))


class SentencePieceTokenizer:
    """A SentencePiece model (`tokenizer.model`, e.g. RecurrentGemma's 256k vocabulary). Like the official sampler
    (GDM torch/sampler.py:190-197, :92), prompts get BOS prepended (by `LM.encode`) and generation stops at EOS."""

    MODEL_FILE = "tokenizer.model"

    def __init__(self, proto: bytes, source: str = MODEL_FILE):
        import sentencepiece as spm

        self.proto = proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError):
            raise CheckpointError(f"{source} is not a SentencePiece model (its protobuf does not parse); pass the "
                                  "tokenizer.model that came with the checkpoint") from None
        self.vocab_size = self.sp.vocab_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.name = f"sentencepiece:{self.vocab_size}"

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        try:
            return cls(Path(path).read_bytes(), str(path))
        except OSError as err:
            raise CheckpointError(f"cannot read tokenizer {path} ({err.strerror or err})") from None

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([i for i in ids if 0 <= i < self.vocab_size])

    def save(self, directory: str | Path) -> None:
        (Path(directory) / self.MODEL_FILE).write_bytes(self.proto)


class TaskTokenizer:
    """Token ids of a synthetic task (no text): saved so a task checkpoint knows its task."""

    bos_id = None

    def __init__(self, task):
        self.task, self.name = task, f"task:{task.name}"
        self.vocab_size, self.eos_id = task.vocab_size, 0

    def encode(self, text: str) -> list[int]:
        """Space-separated token ids, e.g. "3 17 4", each in [0, vocab_size)."""
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise KitelmError(f"a {self.name} checkpoint reads space-separated token ids (e.g. \"3 17 4\"), not text "
                              f"like {text[:20]!r}") from None
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise KitelmError(f"token id {outside[0]} is outside this task's vocabulary [0, {self.vocab_size})")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def save(self, directory: str | Path) -> None:
        (Path(directory) / TOKENIZER_FILE).write_text(
            json.dumps({"kitelm_tokenizer": "task", "task": asdict(self.task)}) + "\n")

    @classmethod
    def from_saved(cls, data: dict) -> "TaskTokenizer":
        spec = dict(data["task"])
        return cls(type(get_task(spec["name"]))(**spec))


class IncrementalDetokenizer:
    """The text of a growing list of generated ids, one `push` at a time, decoding only a window of recent ids.

    The ids cannot be decoded one by one and joined: a UTF-8 character may be split over several tokens (byte
    tokens, byte-level BPE, SentencePiece byte fallback) and SentencePiece drops the leading spaces of what it
    decodes. With ids[:r] already returned as text and ids[p:r] their context (see below), `push` decodes the window
    ids[p:] only:

        new = decode(ids[p:])[len(decode(ids[p:r])):]

    It returns `new` and moves r to len(ids), unless `new` is empty or ends in U+FFFD (an incomplete character whose
    next bytes have not come yet): then it returns "" and `pending` holds `new`. The context moves up to the chunk
    just returned (p = the old r) when that chunk alone decodes to some text, so that the window never starts with
    pieces whose spaces SentencePiece would drop; otherwise it keeps the earlier chunks too. So, for the tokenizers
    here (tests/test_serve.py checks byte, BPE and SentencePiece on random ids), the pieces are those of decoding
    every prefix ids[:k] in full and sending the growth of the text at each k where it does not end in U+FFFD, and
    the text returned so far + `pending` == decode(ids) at every step. The window is the last chunk that decodes to
    text on its own, any chunks since and the ids not yet returned: it grows only while the text keeps ending in
    U+FFFD, new ids add no text, or the chunks returned are spaces alone.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._window: list[int] = []  # ids[p:]
        self._read = 0  # r - p: the window's ids already returned as text
        self._read_text = ""  # decode(ids[p:r])
        self.pending = ""  # the text of ids[r:], held back: "" or ending in U+FFFD

    def push(self, ids: Iterable[int]) -> str:
        """Append `ids` and return the text they complete ("" while it is held back)."""
        self._window.extend(ids)
        text = self.tokenizer.decode(self._window)
        new = text[len(self._read_text):]
        self.pending = "" if new and not new.endswith("\ufffd") else new
        if self.pending or not new:
            return ""
        chunk = self._window[self._read:]
        chunk_text = self.tokenizer.decode(chunk)
        self._window, self._read_text = (chunk, chunk_text) if chunk_text else (self._window, text)
        self._read = len(self._window)
        return new


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """`byte` or `bpe:N` (N ≥ 512) → (kind, vocab size)."""
    if spec == "byte":
        return "byte", None
    kind, _, size = spec.partition(":")
    if kind == "bpe" and size.isdigit() and 512 <= int(size) <= 1 << 20:
        return "bpe", int(size)
    raise ConfigError(f"--tokenizer {spec!r} is not understood; use 'byte' or 'bpe:N' with N >= 512, e.g. bpe:8192")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer saved in a checkpoint folder (`tokenizer.json`, or a SentencePiece `tokenizer.model`)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.exists() and (Path(directory) / SentencePieceTokenizer.MODEL_FILE).exists():
        return SentencePieceTokenizer.from_file(Path(directory) / SentencePieceTokenizer.MODEL_FILE)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint has no tokenizer") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON; the checkpoint is corrupt") from None
    if data.get("kitelm_tokenizer") == "byte":
        return ByteTokenizer()
    if data.get("kitelm_tokenizer") == "task":
        return TaskTokenizer.from_saved(data)
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_file(str(path)))
    except Exception as err:  # tokenizers raises bare Exceptions for malformed files
        raise CheckpointError(f"{path} is not a tokenizer file ({err})") from None
