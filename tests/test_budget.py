"""`kitelm train --minutes N`: the step count fitted to a wall-clock budget, refused budgets, and the run it trains."""

from __future__ import annotations

import json
import types

import pytest

from kitelm import budget, cli
from kitelm.budget import SAFETY, fit_steps
from kitelm.cli import main
from kitelm.errors import KitelmError
from kitelm.train.schedule import lr_at
from test_cli import _error

TINY = ["--model", "transformer-tiny", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "256",
        "--final-eval-tokens", "512", "--no-sample"]
FIT = dict(eval_every=100, eval_windows=8, final_windows=40, batch_size=4, sample=False)


def test_fitted_steps_fill_the_budget_and_no_more():
    # 60 s: 10 s spent, final evaluation 10 batches × 0.5 s, steps of 1 s plus 2 × 0.5 s of evaluation every 100
    fit = fit_steps(1.0, 10.0, 1.0, 0.5, **FIT)
    per_step = 1.0 + 2 * 0.5 / 100
    assert fit.steps == int(SAFETY * (60 - 10 - 5) // per_step)
    assert fit.elapsed_s + fit.steps * fit.step_s + fit.overhead_s <= 60
    assert fit.elapsed_s + (fit.steps + 1) * per_step + 5 > SAFETY * 60 - 1  # one more step would not fit the margin
    # uncached compressors and the sample are counted: 3 × 1.2 MB at 1.2 MB/s on 2 threads, and SAMPLE_S
    slower = fit_steps(1.0, 10.0, 1.0, 0.5, **{**FIT, "sample": True}, xz_bytes=int(3 * 1.2e6))
    assert slower.steps == int(SAFETY * (60 - 10 - 5 - 1.5 - budget.SAMPLE_S) // per_step)


@pytest.mark.parametrize("minutes, elapsed", [(0.1, 1.0), (1.0, 59.0), (1.0, 120.0)])
def test_a_budget_too_small_for_one_step_names_the_budget_that_fits(minutes, elapsed):
    with pytest.raises(KitelmError, match=r"--minutes .* is too small .* give --minutes ([0-9.]+) or more") as err:
        fit_steps(minutes, elapsed, 5.0, 0.5, **FIT)
    need = float(str(err.value).split("give --minutes ")[1].split()[0])
    assert fit_steps(need, elapsed, 5.0, 0.5, **FIT).steps >= 1


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "ten"])
def test_bad_minutes_is_one_line_and_exit_2(value, tmp_path, capsys):
    assert "--minutes" in _error(capsys, ["train", "--minutes", value, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_minutes_with_resume_is_refused(tmp_path, capsys):
    assert "--minutes fits" in _error(capsys, ["train", "--minutes", "5", "--resume", "auto", "--out", str(tmp_path)])


def test_a_budget_too_small_is_refused_before_training(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(budget, "time_step", lambda trainer: (100.0, 1.0))  # a machine where one step takes 100 s
    line = _error(capsys, ["train", "--data", str(corpus_dir), "--out", str(tmp_path), "--minutes", "1", *TINY])
    assert "too small" in line and "one training step takes 100.0 s" in line
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_minutes_trains_the_fitted_steps_with_the_schedule_spanning_them(corpus_dir, tmp_path, capsys, monkeypatch):
    # a machine where a step takes 1 s and start-up nothing (a frozen clock): the fit is the same on every machine
    monkeypatch.setattr(budget, "time_step", lambda trainer: (1.0, 0.001))
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(monotonic=lambda: 0.0))
    assert main(["train", "--data", str(corpus_dir), "--out", str(tmp_path), "--minutes", "0.2", "--warmup-steps",
                 "30", *TINY]) == 0
    out = capsys.readouterr().out
    steps = int(out.split("--minutes 0.2: ")[1].split()[0])
    assert 1 <= steps <= 12 and f"{steps} steps × 4 sequences" in out
    config = json.loads((tmp_path / "run.json").read_text())["train_config"]
    assert config["steps"] == steps and config["warmup_steps"] == min(30, steps // 10)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == steps
    last = [r for r in rows if "lr" in r][-1]  # the schedule ends with the fitted run: its last step at the floor
    assert last["lr"] == lr_at(steps - 1, 3e-3, steps, min(30, steps // 10), "cosine", 0.1)
