"""The report of `kitelm reproduce`: `REPORT.md` from every finished experiment, and publishing a finished run into
the README (`kitelm reproduce --out DIR --publish README.md`): it copies DIR into `benchmarks/results/reproduce/`
beside the README and regenerates the README's block between `<!-- reproduce:begin -->` and `<!-- reproduce:end -->`
with the claims table and plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import KitelmError
from ..machine import peaks_line
from ..study import results_table
from .runs import EXPERIMENTS, FIGURES


def _records(out: Path) -> list[dict]:
    """Every finished experiment's record, its claims judged again from its stored measurements by this version's
    rules (a report never shows a verdict from rules that have since been corrected)."""
    records = [json.loads((out / n / "result.json").read_text()) for n in EXPERIMENTS
               if (out / n / "result.json").exists()]
    for rec in records:
        rec["claims"] = EXPERIMENTS[rec["experiment"]][1](rec["data"])
    return records


def _figures(out: Path, experiment: str) -> list[str]:
    """`<experiment>/<png>` of the figures that experiment wrote."""
    return [f"{experiment}/{png}" for png in FIGURES.get(experiment, []) if (out / experiment / png).exists()]


def _summary(records: list[dict]) -> list[str]:
    """The report's opening: machine and allocator settings, then one table row per claim."""
    first = records[0]["machine"]
    unset = [r["experiment"] for r in records if not r["machine"]["allocator_env"]]
    allocator = (f"glibc allocator env NOT set for {', '.join(unset)} (memory-bound timings up to 4× slower)"
                 if unset else "glibc allocator env set")
    flags = f" (flags {', '.join(first['cpu_flags'])})" if "cpu_flags" in first else ""  # older runs lack them
    peaks = f"; {peaks_line(first)}" if peaks_line(first) else ""
    dtype = f"; compute dtype {first['dtype']}" if "dtype" in first else ""
    # experiments rerun later (a finished one is skipped, so one can be moved aside and run again) name their commit
    later = [f"{r['experiment']} {r['commit']}" + (f", {r['machine']['threads']} threads"
                                                    if r["machine"]["threads"] != first["threads"] else "")
             for r in records if r["commit"] != records[0]["commit"]]
    commit = f"commit {records[0]['commit']}" + (f" (rerun: {', '.join(later)})" if later else "")
    lines = [f"Machine: {first['cpu']}{flags}, {first['threads']} threads, torch {first['torch']}{dtype}{peaks}; "
             f"{commit}; {allocator}. Small models on CPU: the papers trained billions of tokens on accelerators, so a verdict "
             "says whether the *direction* of each claim shows at this scale.", "",
             "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    for rec in records:
        lines += [f"| {c['claim']} | {c['paper']} | {c['ours']} | **{c['verdict']}** |" for c in rec["claims"]]
    return lines


def write_report(out: Path) -> Path:
    """REPORT.md from every `result.json`: the claims table, then each experiment's provenance and figures."""
    records = _records(out)
    lines = ["# kitelm reproduce", "", *_summary(records)]
    for rec in records:
        lines += ["", f"## {rec['experiment']}", "",
                  f"{rec['seconds']:.0f} s at {rec['scale']['steps']} training steps ({rec['scale']['task_steps']} "
                  f"on tasks); command `{rec['command']}`; commit {rec['commit']}; corpus "
                  f"`{json.dumps(rec['corpus'])}`. Data: `{rec['experiment']}/result.json`."]
        if "study" in rec["data"]:
            lines += ["", results_table(rec["data"]["study"])]
        lines += [f"\n![{rec['experiment']}]({png})" for png in _figures(out, rec["experiment"])]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
PUBLISHED = Path("benchmarks/results/reproduce")  # beside the README, so that its links are relative


def publish(out_dir: str | Path, readme: str | Path) -> Path:
    """Copy a finished run (REPORT.md, `<experiment>/result.json`, figures) into `PUBLISHED` beside `readme` and
    replace the lines between its BEGIN and END markers with the claims table and the plots. The folder is replaced
    as a whole (files of an older run do not linger). Runs no experiment; returns the folder written."""
    out, readme = Path(out_dir), Path(readme)
    missing = [n for n in EXPERIMENTS if not (out / n / "result.json").exists()]
    if missing or not (out / "REPORT.md").exists():
        what = "no REPORT.md" if not (out / "REPORT.md").exists() else f"no result for {', '.join(missing)}"
        raise KitelmError(f"{out} holds no finished reproduction ({what}); run `kitelm reproduce --out {out}` first")
    if not readme.is_file():
        raise KitelmError(f"no README at {readme}")
    text = readme.read_text()
    begin, end = text.find(BEGIN), text.find(END)
    if text.count(BEGIN) != 1 or text.count(END) != 1 or end < begin:
        raise KitelmError(f"{readme} needs one '{BEGIN}' line and, after it, one '{END}' line around the block that "
                          "`kitelm reproduce --publish` regenerates")
    folder = readme.parent / PUBLISHED
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    records = _records(out)
    figures = [png for rec in records for png in _figures(out, rec["experiment"])]
    for name in ["REPORT.md", *(f"{rec['experiment']}/result.json" for rec in records), *figures]:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / name, staging / name)
    shutil.rmtree(folder, ignore_errors=True)  # the folder is generated: a stale figure of an older run must not stay
    staging.rename(folder)
    link = PUBLISHED.as_posix()
    studies = [rec["data"]["study"] for rec in records if "study" in rec["data"]]
    block = ["<!-- generated by `kitelm reproduce --publish`: edits between the markers are overwritten -->",
             *_summary(records), "",
             *(line for study in studies for line in ("Block study (`kitelm study blocks`): " + results_table(study),
                                                        "")),
             f"Full report with each experiment's command, scale and corpus: [{link}/REPORT.md]({link}/REPORT.md).", "",
             *(f"![{png}]({link}/{png})" for png in figures)]
    readme.write_text(text[:begin + len(BEGIN)] + "\n" + "\n".join(block) + "\n" + text[end:])
    return folder
