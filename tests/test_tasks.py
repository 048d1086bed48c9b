"""Synthetic tasks: structure of every sample, determinism, and training/eval through the CLI."""

import json

import pytest
import torch

from kitelm.cli import main
from kitelm.data.tasks import TASKS, Induction, PhoneBook, SelectiveCopy, TaskSampler, get_task
from kitelm.errors import ConfigError


def _sample(task, n=16, seed=0):
    tokens, mask = task.sample(torch.Generator().manual_seed(seed), n)
    assert tokens.shape == (n, task.seq_len + 1) and mask.shape == (n, task.seq_len)
    assert tokens.min() >= 0 and tokens.max() < task.vocab_size
    return tokens, mask


def test_selective_copy_answers_are_the_scattered_symbols_in_order():
    task = SelectiveCopy()
    tokens, mask = _sample(task)
    for row, m in zip(tokens, mask):
        context = row[: task.length]
        assert torch.equal(row[1:][m], context[context > 0])
        assert row[task.length] == task.n_symbols + 1  # SEP


def test_induction_answers_follow_each_keys_first_occurrence():
    task = Induction()
    tokens, mask = _sample(task)
    assert mask.sum(-1).eq(task.n_pairs).all()
    for row, m in zip(tokens, mask):
        answers = m.nonzero().flatten() + 1  # positions in `row` of the scored tokens
        for at in answers.tolist():
            key = row[at - 1].item()
            assert key > task.n_symbols and (row == key).sum() == 2  # a key occurs exactly twice
            first = (row == key).nonzero()[0].item()
            assert first < at - 1 and row[at] == row[first + 1]


def test_induction_refuses_more_pairs_than_keys():
    with pytest.raises(ConfigError, match="n_pairs <= n_keys"):
        Induction(n_pairs=20)


def test_phonebook_answer_is_the_queried_number():
    task = PhoneBook()
    tokens, mask = _sample(task)
    entry = task.name_len + task.number_len + 2
    for row, m in zip(tokens, mask):
        book = row[: task.n_entries * entry].reshape(task.n_entries, entry)
        name = row[task.n_entries * entry + 1: task.n_entries * entry + 1 + task.name_len]
        match = [e for e in book if torch.equal(e[: task.name_len], name)]
        assert any(torch.equal(e[task.name_len + 1: task.name_len + 1 + task.number_len], row[1:][m]) for e in match)


def test_sampler_is_deterministic_and_differs_between_steps_and_ranks():
    sampler = TaskSampler(Induction(), 4, seed=3)
    assert torch.equal(sampler.batch(5)[0], TaskSampler(Induction(), 4, seed=3).batch(5)[0])
    assert not torch.equal(sampler.batch(5)[0], sampler.batch(6)[0])
    assert not torch.equal(sampler.batch(5, rank=0)[0], sampler.batch(5, rank=1)[0])


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'copy'"):
        get_task("copy")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_eval_a_task_through_the_cli(name, tmp_path, capsys):
    assert main(["train", "--task", name, "--model", "transformer-tiny", "--steps", "4", "--batch-size", "4",
                 "--eval-every", "2", "--eval-tokens", "1024", "--out", str(tmp_path)]) == 0
    assert "exact-match accuracy" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["task"] == name and 0 <= result["accuracy"] <= 1 and result["loss"] > 0
