"""Benchmark output: `results.json` (every row, the machine, the command), `results.md` (tables) and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from ...plotting import saved_figure
from ..machine import peaks_line


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_no rows_\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def model_lines(rows: list[dict], x: str, y: str, path: Path, title: str, ylabel: str) -> None:
    """One line per (model, implementation) of `y` against `x`, on a log2 x axis."""
    with saved_figure(path, legend_fontsize=8) as (ax,):
        for key in dict.fromkeys((r["model"], r.get("impl", "kitelm")) for r in rows):
            pts = [(r[x], r[y]) for r in rows if (r["model"], r.get("impl", "kitelm")) == key and y in r]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{key[0]} ({key[1]})" if "impl" in rows[0] else key[0])
        ax.set_xscale("log", base=2)
        ax.set(xlabel=x, ylabel=ylabel, title=title)


def write(out: Path, machine: dict, settings, results: dict[str, list[dict]],
          experiments: dict[str, ModuleType]) -> None:
    """Write every result so far; each experiment module gives its `NOTE` and, if it has one, its `plot`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "settings": asdict(settings), "results": results},
                                                 indent=2) + "\n")
    peaks = peaks_line(machine)
    md = [f"# kitelm bench\n\nMachine: {machine['cpu']} (flags {', '.join(machine['cpu_flags']) or 'unknown'}; "
          f"torch kernels {machine['torch_cpu_capability']}), {machine['threads']} threads, torch {machine['torch']}, "
          f"compute dtype {machine.get('dtype', settings.dtype)}" + (f"; {peaks}" if peaks else "")
          + f"; allocator env {'set' if machine['allocator_env'] else 'NOT set'}, "
          f"commit {machine['commit']}.  \nCommand: `{machine['command']}`\n"]
    for name, rows in results.items():
        md.append(f"\n## {name}\n\n{experiments[name].NOTE}\n\n{markdown_table(rows)}")
    (out / "results.md").write_text("\n".join(md))
    for name, rows in results.items():
        if rows and hasattr(experiments[name], "plot"):
            experiments[name].plot(rows, settings, out)
