"""`kitelm reproduce` end to end at a tiny scale (tiny presets, 2 steps): report, resuming, a too-small budget."""

from __future__ import annotations

import json

import pytest

from kitelm.cli import main
from kitelm.errors import KitelmError
from kitelm.reproduce import EXPERIMENTS, Scale, run_reproduce


def _tiny(corpus_dir) -> Scale:
    return Scale(steps=2, task_steps=2, batch_size=2, seq_len=16, data=str(corpus_dir), repeats=1, eval_windows=2,
                 throughput_models=("preln-small", "sas-small", "sas-p-small", "transformer-tiny", "griffin-tiny"),
                 lm_models=(("Griffin", "griffin-tiny"), ("Transformer", "transformer-tiny")),
                 task_models=(("Griffin", "griffin-tiny"), ("Hawk", "hawk-tiny"), ("Transformer", "transformer-tiny")),
                 tasks=("induction",), sample_models=("griffin-tiny", "transformer-tiny"), prompt_len=8,
                 sample_lengths=(4, 16), memory_models=("griffin-tiny", "transformer-tiny"), memory_lengths=(64, 256),
                 rss_max_len=0)


def test_report_has_a_verdict_per_claim_and_a_second_run_skips_finished_work(corpus_dir, tmp_path):
    lines: list[str] = []
    report = run_reproduce(tmp_path, scale=_tiny(corpus_dir), log=lines.append)
    text = report.read_text()
    verdicts = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert len(verdicts) >= len(EXPERIMENTS)
    assert all(v.rsplit("**", 2)[1] in ("holds", "partly", "does not") for v in verdicts)
    for name in EXPERIMENTS:
        record = json.loads((tmp_path / name / "result.json").read_text())
        assert record["machine"]["cpu"] and "commit" in record and "command" in record and "corpus" in record
    assert json.loads((tmp_path / "extrapolation" / "result.json").read_text())["corpus"]["files"] > 0
    assert (tmp_path / "extrapolation" / "extrapolation.png").exists() and (tmp_path / "tasks" / "tasks.png").exists()

    (tmp_path / "tasks" / "result.json").unlink()  # as if interrupted during the last experiment
    mtime = (tmp_path / "params" / "result.json").stat().st_mtime_ns
    run_reproduce(tmp_path, scale=_tiny(corpus_dir))
    assert (tmp_path / "params" / "result.json").stat().st_mtime_ns == mtime
    assert (tmp_path / "tasks" / "result.json").exists()


def test_a_budget_too_small_says_what_it_needs(tmp_path, capsys):
    with pytest.raises(KitelmError, match=r"too small: .* needs about \d+ minutes"):
        run_reproduce(tmp_path, budget_minutes=0.1)
    assert main(["reproduce", "--budget-minutes", "0.1", "--out", str(tmp_path)]) == 2
    assert "give --budget-minutes" in capsys.readouterr().err
