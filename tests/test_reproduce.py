"""`kitelm reproduce` end to end at a tiny scale (tiny presets, 2 steps): report, resuming, a too-small budget; and
`--publish` from a fake finished run folder (no training)."""

from __future__ import annotations

import json

import pytest

from kitelm.cli import main
from kitelm.errors import KitelmError
from kitelm.reproduce import EXPERIMENTS, FIGURES, PUBLISHED, Scale, publish, run_reproduce, write_report


def _tiny(corpus_dir) -> Scale:
    return Scale(steps=2, task_steps=2, batch_size=2, seq_len=16, data=str(corpus_dir), repeats=1, eval_windows=2,
                 block_variants=(("Pre-LN", "preln-small"), ("SAS", "sas-small"), ("SAS-P", "sas-p-small"),
                                 ("Griffin", "griffin-tiny"), ("Griffin-SAS", "griffin-sas-tiny")), block_seeds=1,
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


def _finished_run(folder):
    """A run folder as `run_reproduce` leaves it: one result.json per experiment, its figures, REPORT.md."""
    machine = {"cpu": "Test CPU", "threads": 2, "torch": "2.x", "commit": "abc1234", "allocator_env": True}
    for name in EXPERIMENTS:
        (folder / name).mkdir(parents=True)
        claim = {"claim": f"{name} claim", "paper": "paper value", "ours": "our value", "verdict": "holds"}
        record = {"experiment": name, "command": "kitelm reproduce", "commit": "abc1234", "machine": machine,
                  "corpus": None, "scale": {"steps": 2, "task_steps": 2}, "seconds": 1.0, "data": {},
                  "claims": [claim]}
        (folder / name / "result.json").write_text(json.dumps(record))
        for png in FIGURES.get(name, []):
            (folder / name / png).write_bytes(b"\x89PNG " + png.encode())
    write_report(folder)
    return folder


README = "# Title\n\nBefore the block.\n\n<!-- reproduce:begin -->\nnot published yet\n<!-- reproduce:end -->\n\nAfter.\n"


def test_publish_rewrites_only_the_marked_block_and_copies_the_run(tmp_path):
    run = _finished_run(tmp_path / "run")
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

    publish(run, readme)  # idempotent
    assert readme.read_text() == text


def test_publish_refuses_an_unfinished_run_or_a_readme_without_markers(tmp_path, capsys):
    run = _finished_run(tmp_path / "run")
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
