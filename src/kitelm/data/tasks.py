"""Synthetic sequence tasks from the Griffin paper (§6), generated in-process: no downloads, any size.

Every sample is `tokens [T+1]` plus `mask [T]`, True where the next-token target is an answer token; only answers are
scored (loss and exact-match accuracy). Token 0 is padding/blank; the last ids are the task's special symbols.

- `selective-copy`: `n_data` symbols scattered at random positions among blanks, then SEP, then the same symbols in
  order (Arjovsky et al. 2016; Gu & Dao 2023). Needs content-dependent selection.
- `induction`: several key → value pairs scattered in random symbols, then every key again and the model must produce
  its value (Olsson et al. 2022's `A B … A → B`, one answer per pair). Needs copying from an arbitrary distance.
- `phonebook`: `n_entries` lines `name : number ;` then `? name :` and the number (Jelassi et al. 2024, as in the
  Griffin paper's retrieval experiment). Needs retrieval of several tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SelectiveCopy:
    name: str = "selective-copy"
    length: int = 96  # context before SEP
    n_data: int = 8
    n_symbols: int = 16

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2  # blank, symbols, SEP

    @property
    def chance_loss(self) -> float:
        """Answer loss of a model that knows only which symbols can answer: ln(n_symbols) nats."""
        return math.log(self.n_symbols)

    @property
    def seq_len(self) -> int:
        return self.length + self.n_data

    def sample(self, g: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        sep = self.n_symbols + 1
        data = torch.randint(1, self.n_symbols + 1, (batch, self.n_data), generator=g)
        where = torch.rand(batch, self.length, generator=g).argsort(-1)[:, : self.n_data].sort(-1).values
        context = torch.zeros(batch, self.length, dtype=torch.long).scatter(1, where, data)
        tokens = torch.cat([context, torch.full((batch, 1), sep), data], 1)  # [B, length + 1 + n_data]
        mask = torch.zeros(batch, self.seq_len, dtype=torch.bool)
        mask[:, self.length:] = True  # targets at positions length+1 .. : the copied symbols
        return tokens, mask


@dataclass(frozen=True)
class Induction:
    """`n_pairs` distinct keys, each followed by a value symbol, at random places in random filler; then the recall
    part: every key again, in a random order, each followed by its value. A key occurs exactly twice, so at its
    second occurrence the answer is the token after its first (the induction pattern `A B … A → B`, Olsson et al.
    2022); with several pairs and every recalled value scored (as in multi-query associative recall, Arora et al.
    2023) a sample carries `n_pairs` supervised tokens instead of one.

    Layout of `tokens [length + 1]`: context (filler and pairs, `length + 1 − 2·n_pairs` tokens) | k v k v …
    (the recall part, `2·n_pairs` tokens).
    """

    name: str = "induction"
    length: int = 64
    n_pairs: int = 16  # 16 answers of 64 tokens: dense enough for a tiny Transformer to learn it in ~4,000 steps
    n_keys: int = 16
    n_symbols: int = 16

    def __post_init__(self):
        if not 1 <= self.n_pairs <= self.n_keys or self.length + 1 - 2 * self.n_pairs < 2 * self.n_pairs:
            raise ConfigError(f"induction needs 1 <= n_pairs <= n_keys and room for {self.n_pairs} pairs in the "
                              f"context; got length={self.length}, n_pairs={self.n_pairs}, n_keys={self.n_keys}")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_symbols + self.n_keys  # pad, symbols (filler and values), keys

    @property
    def chance_loss(self) -> float:
        """Answer loss of a model that knows only that a value is one of the symbols: ln(n_symbols) nats."""
        return math.log(self.n_symbols)

    @property
    def seq_len(self) -> int:
        return self.length

    def sample(self, g: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.length + 1 - 2 * self.n_pairs
        keys = 1 + self.n_symbols + torch.rand(batch, self.n_keys, generator=g).argsort(-1)[:, : self.n_pairs]
        values = torch.randint(1, self.n_symbols + 1, (batch, self.n_pairs), generator=g)
        # Non-overlapping pair starts, uniform over placements: sorted distinct s_i in [0, context − n_pairs), + i.
        slots = torch.rand(batch, context - self.n_pairs, generator=g).argsort(-1)[:, : self.n_pairs].sort(-1).values
        starts = slots + torch.arange(self.n_pairs)
        tokens = torch.randint(1, self.n_symbols + 1, (batch, self.length + 1), generator=g)
        tokens.scatter_(1, starts, keys)
        tokens.scatter_(1, starts + 1, values)
        order = torch.rand(batch, self.n_pairs, generator=g).argsort(-1)
        recall = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).reshape(batch, -1)
        tokens[:, context:] = recall
        mask = torch.zeros(batch, self.seq_len, dtype=torch.bool)
        mask[:, context::2] = True  # targets at context+1, context+3, …: the recalled values
        return tokens, mask


@dataclass(frozen=True)
class PhoneBook:
    name: str = "phonebook"
    n_entries: int = 12
    name_len: int = 2
    number_len: int = 3
    n_letters: int = 20
    n_digits: int = 10

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_letters + self.n_digits + 3  # pad, letters, digits, ':' ';' '?'

    @property
    def chance_loss(self) -> float:
        return math.log(self.n_digits)

    @property
    def seq_len(self) -> int:
        entry = self.name_len + self.number_len + 2
        return self.n_entries * entry + 1 + self.name_len + 1 + self.number_len - 1

    def sample(self, g: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        colon, semi, query = (1 + self.n_letters + self.n_digits + i for i in range(3))
        names = torch.randint(1, 1 + self.n_letters, (batch, self.n_entries, self.name_len), generator=g)
        numbers = torch.randint(1 + self.n_letters, 1 + self.n_letters + self.n_digits,
                                (batch, self.n_entries, self.number_len), generator=g)
        book = torch.cat([names, torch.full((batch, self.n_entries, 1), colon), numbers,
                          torch.full((batch, self.n_entries, 1), semi)], -1).reshape(batch, -1)
        pick = torch.randint(0, self.n_entries, (batch,), generator=g)
        rows = torch.arange(batch)
        tokens = torch.cat([book, torch.full((batch, 1), query), names[rows, pick],
                            torch.full((batch, 1), colon), numbers[rows, pick]], 1)
        mask = torch.zeros(batch, self.seq_len, dtype=torch.bool)
        mask[:, -self.number_len:] = True
        return tokens, mask


TASKS = {t.name: t for t in (SelectiveCopy(), Induction(), PhoneBook())}
VALIDATION_SEED = 1_000_003


def get_task(name: str):
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


class TaskSampler:
    """Deterministic task batches: batch(step, micro, rank) is a pure function of the seed and those indices."""

    def __init__(self, task, micro_batch: int, seed: int = 0, world: int = 1):
        self.task, self.micro_batch, self.seed, self.world = task, micro_batch, seed, world

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(hash((self.seed, step, micro, rank, self.world)) & (2**62 - 1))
        return self.task.sample(g, self.micro_batch)


def validation_set(task, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return task.sample(torch.Generator().manual_seed(VALIDATION_SEED), n)


@torch.no_grad()
def task_accuracy(model, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 64) -> float:
    """Fraction of samples whose every answer token is predicted exactly (greedy, teacher-forced)."""
    model.eval()
    correct = 0
    for i in range(0, len(tokens), batch_size):
        x, m = tokens[i: i + batch_size], mask[i: i + batch_size]
        pred = model(x[:, :-1]).argmax(-1)
        correct += ((pred == x[:, 1:]) | ~m).all(-1).sum().item()
    return correct / len(tokens)
