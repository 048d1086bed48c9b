"""`kitelm reproduce` end to end at a tiny scale (tiny presets, 2 steps): report, resuming, a too-small budget; and
`--publish` from a fake finished run folder (no training)."""

from __future__ import annotations

import json

import pytest

from kitelm.cli import main
from kitelm.errors import KitelmError
from kitelm.experiments.reproduce import run_reproduce
from kitelm.experiments.reproduce.claims import claims_blocks, claims_tasks
from kitelm.experiments.reproduce.report import PUBLISHED, publish, write_report
from kitelm.experiments.reproduce.runs import EXPERIMENTS, FIGURES
from kitelm.experiments.settings import ReproduceScale


def _tiny(corpus_dir) -> ReproduceScale:
    return ReproduceScale(
        steps=2, task_steps=2, batch_size=2, seq_len=16, data=str(corpus_dir), repeats=1, eval_windows=2,
        block_variants=(("Pre-LN", "preln-small"), ("SAS", "sas-small"), ("SAS-P", "sas-p-small"),
                        ("Griffin", "griffin-tiny"), ("Griffin-SAS", "griffin-sas-tiny")), seeds=1,
        throughput_models=("transformer-tiny", "griffin-tiny"),
        lm_models=(("Griffin", "griffin-tiny"), ("Transformer", "transformer-tiny")),
        task_models=(("Griffin", "griffin-tiny", ()), ("Hawk", "hawk-tiny", ()),
                     ("Transformer", "transformer-tiny", ())),
        tasks=("induction",), sample_models=("griffin-tiny", "transformer-tiny"), prompt_len=8,
        sample_lengths=(4, 16), memory_models=("griffin-tiny", "transformer-tiny"), memory_lengths=(64, 256),
        rss_max_len=0)


def test_report_has_a_verdict_per_claim_and_a_second_run_skips_finished_work(corpus_dir, tmp_path):
    lines: list[str] = []
    report = run_reproduce(tmp_path, scale=_tiny(corpus_dir), log=lines.append)
    text = report.read_text()
    verdicts = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert len(verdicts) >= len(EXPERIMENTS)
    assert all(v.rsplit("**", 2)[1] in ("holds", "partly", "does not", "inconclusive") for v in verdicts)
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


def _finished_run(folder, monkeypatch):
    """A run folder as `run_reproduce` leaves it: one result.json per experiment, its figures, REPORT.md. The data are
    empty, so each experiment's claims rule is replaced by one that returns its fake claim."""
    machine = {"cpu": "Test CPU", "threads": 2, "torch": "2.x", "commit": "abc1234", "allocator_env": True}
    for name in EXPERIMENTS:
        (folder / name).mkdir(parents=True)
        claim = {"claim": f"{name} claim", "paper": "paper value", "ours": "our value", "verdict": "holds"}
        monkeypatch.setitem(EXPERIMENTS, name, (EXPERIMENTS[name][0], lambda data, c=claim: [c]))
        record = {"experiment": name, "command": "kitelm reproduce", "commit": "abc1234", "machine": machine,
                  "corpus": None, "scale": {"steps": 2, "task_steps": 2}, "seconds": 1.0, "data": {},
                  "claims": [claim]}
        (folder / name / "result.json").write_text(json.dumps(record))
        for png in FIGURES.get(name, []):
            (folder / name / png).write_bytes(b"\x89PNG " + png.encode())
    write_report(folder)
    return folder


README = "# Title\n\nBefore the block.\n\n<!-- reproduce:begin -->\nnot published yet\n<!-- reproduce:end -->\n\nAfter.\n"


def test_publish_rewrites_only_the_marked_block_and_copies_the_run(tmp_path, monkeypatch):
    run = _finished_run(tmp_path / "run", monkeypatch)
    readme = tmp_path / "site" / "README.md"
    readme.parent.mkdir()
    readme.write_text(README)
    assert main(["reproduce", "--out", str(run), "--publish", str(readme)]) == 0
    text = readme.read_text()
    head, rest = text.split("<!-- reproduce:begin -->\n")
    block, tail = rest.split("<!-- reproduce:end -->")
    assert head == "# Title\n\nBefore the block.\n\n" and tail == "\n\nAfter.\n"
    assert "not published yet" not in block and "allocator env set" in block
    assert all(f"| {name} claim | paper value | our value | **holds** |" in block for name in EXPERIMENTS)
    published = readme.parent / PUBLISHED
    assert (published / "REPORT.md").read_text() == (run / "REPORT.md").read_text()
    for name in EXPERIMENTS:
        assert (published / name / "result.json").exists()
        for png in FIGURES.get(name, []):
            assert (published / name / png).read_bytes() == (run / name / png).read_bytes()
            assert f"]({PUBLISHED.as_posix()}/{name}/{png})" in block  # a link relative to the README

    stale = published / "blocks" / "an_older_figure.png"
    stale.write_bytes(b"old")
    publish(run, readme)  # idempotent, and files of an older run do not linger
    assert readme.read_text() == text and not stale.exists() and (published / "REPORT.md").exists()


def test_publish_refuses_an_unfinished_run_or_a_readme_without_markers(tmp_path, capsys, monkeypatch):
    run = _finished_run(tmp_path / "run", monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nno markers\n")
    assert main(["reproduce", "--out", str(run), "--publish", str(readme)]) == 2
    err = capsys.readouterr().err
    assert "<!-- reproduce:begin -->" in err and len(err.strip().splitlines()) == 1
    assert readme.read_text() == "# Title\n\nno markers\n" and not (tmp_path / PUBLISHED).exists()

    readme.write_text(README)
    (run / "tasks" / "result.json").unlink()  # REPORT.md of an earlier run, `tasks` being rerun
    with pytest.raises(KitelmError, match="no result for tasks"):
        publish(run, readme)
    (run / "REPORT.md").unlink()
    with pytest.raises(KitelmError, match=r"\(no REPORT.md\); run `kitelm reproduce --out"):
        publish(run, readme)
    assert readme.read_text() == README


def _task_result(final: float, curve: list[float]) -> dict:
    return {"loss": final, "accuracy": 0.0, "curve": [[10 * (i + 1), loss] for i, loss in enumerate(curve)]}


def test_report_names_the_commit_of_an_experiment_rerun_later(tmp_path, monkeypatch):
    run = _finished_run(tmp_path / "run", monkeypatch)
    assert "commit abc1234;" in (run / "REPORT.md").read_text()
    record = json.loads((run / "tasks" / "result.json").read_text())
    rerun = record | {"commit": "def5678", "machine": record["machine"] | {"threads": 1}}
    (run / "tasks" / "result.json").write_text(json.dumps(rerun))
    assert "commit abc1234 (rerun: tasks def5678, 1 threads);" in write_report(run).read_text()


def test_default_task_models_see_the_whole_sample_with_a_kv_head_per_query_head():
    from kitelm.data.tasks import get_task

    scale = ReproduceScale()
    configs = dict(scale.task_configs())
    assert set(configs) == {"Griffin", "Hawk", "Transformer"}
    assert configs["Transformer"].arch == "transformer"
    assert configs["Transformer"].kv_heads == configs["Transformer"].n_heads  # MHA: see settings.task_models
    assert all(configs["Griffin"].attention_window >= get_task(t).seq_len for t in scale.tasks)


def test_tasks_verdict_is_inconclusive_when_no_model_learned_and_judges_speed_by_the_whole_curve():
    chance = 2.7726  # ln 16
    at_chance = {m: _task_result(chance - 0.05, [chance, chance - 0.05]) for m in ("Griffin", "Hawk", "Transformer")}
    hawk, griffin = claims_tasks({"results": {"induction": at_chance}})
    assert hawk["verdict"] == griffin["verdict"] == "inconclusive" and "no model learned it" in hawk["ours"]

    # all three end at zero loss; Hawk got there last, which only the mean over the curve shows
    learned = {"Griffin": _task_result(0.0, [2.0, 0.1, 0.0]), "Transformer": _task_result(0.0, [1.8, 0.0, 0.0]),
               "Hawk": _task_result(0.0, [2.7, 1.5, 0.0])}
    assert claims_tasks({"results": {"induction": learned}})[0]["verdict"] == "holds"
    learned["Hawk"] = _task_result(0.0, [2.0, 0.1, 0.0])  # slower than the Transformer, as fast as Griffin
    assert claims_tasks({"results": {"induction": learned}})[0]["verdict"] == "partly"
    learned["Hawk"] = _task_result(0.0, [1.8, 0.0, 0.0])
    mixed = {"induction": learned, "selective-copy": at_chance}  # one task learned, the other not: judged on one
    assert claims_tasks({"results": mixed})[0]["verdict"] == "does not"


def test_tasks_verdict_judges_griffin_against_the_transformer_on_each_learned_task():
    fast, slow = _task_result(0.0, [1.0, 0.0, 0.0]), _task_result(0.0, [2.7, 2.0, 0.0])
    hawk = _task_result(2.7, [2.7, 2.7, 2.7])
    def griffin_verdict(results):
        return claims_tasks({"results": results})[1]["verdict"]

    assert griffin_verdict({"induction": {"Griffin": fast, "Transformer": slow, "Hawk": hawk}}) == "holds"  # faster
    assert griffin_verdict({"induction": {"Griffin": slow, "Transformer": slow, "Hawk": hawk}}) == "holds"  # equal
    assert griffin_verdict({"induction": {"Griffin": slow, "Transformer": fast, "Hawk": hawk}}) == "does not"
    both = {"induction": {"Griffin": slow, "Transformer": fast, "Hawk": hawk},
            "selective-copy": {"Griffin": fast, "Transformer": fast, "Hawk": hawk}}
    assert griffin_verdict(both) == "partly"


def test_tasks_verdict_skips_a_pair_neither_of_which_learned_the_task():
    """Griffin learned induction; Hawk and the Transformer both sat near chance: Hawk is judged against Griffin only."""
    griffin, stuck = _task_result(0.0, [0.5, 0.0, 0.0]), _task_result(2.7, [2.77, 2.75, 2.7])
    hawk, transformer = claims_tasks({"results": {"induction": {"Griffin": griffin, "Hawk": stuck,
                                                               "Transformer": stuck}}})
    assert hawk["verdict"] == "holds" and transformer["verdict"] == "holds"
    hawk, _ = claims_tasks({"results": {"induction": {"Griffin": stuck, "Hawk": stuck, "Transformer": stuck}}})
    assert hawk["verdict"] == "inconclusive"


def test_blocks_speed_claim_uses_the_studys_tokens_per_second():
    def variant(label, loss, speed):
        return {"label": label, "final_val_loss": loss, "tokens_per_s": speed}

    study = {"recipe": {"steps": 100}, "variants": [variant("Pre-LN", 2.0, 1000.0), variant("SAS", 2.03, 1090.0),
                                                     variant("SAS-P", 2.02, 1120.0)]}
    loss, speed = claims_blocks({"study": study})
    assert loss["verdict"] == "holds" and "SAS +0.030 nats" in loss["ours"]
    assert speed["verdict"] == "holds" and "SAS ×1.09, SAS-P ×1.12" in speed["ours"]
    study["variants"][2]["tokens_per_s"] = 1050.0  # below the 1.10 target, still faster
    assert claims_blocks({"study": study})[1]["verdict"] == "partly"
    study["variants"][1]["tokens_per_s"] = 990.0
    assert claims_blocks({"study": study})[1]["verdict"] == "does not"
