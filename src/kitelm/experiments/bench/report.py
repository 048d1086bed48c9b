"""Benchmark output: `results.json` (every row, the machine, the command), `results.md` (tables) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path


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


def _plot_lines(rows: list[dict], x: str, y: str, path: Path, title: str, ylabel: str, logx: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in dict.fromkeys((r["model"], r.get("impl", "kitelm")) for r in rows):
        pts = [(r[x], r[y]) for r in rows if (r["model"], r.get("impl", "kitelm")) == key and y in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"{key[0]} ({key[1]})" if "impl" in rows[0] else key[0])
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=x, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, machine: dict, settings: dict, results: dict[str, list[dict]], notes: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "settings": settings, "results": results},
                                                 indent=2) + "\n")
    md = [f"# kitelm bench\n\nMachine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
          f"dtype {settings['dtype']}, allocator env {'set' if machine['allocator_env'] else 'NOT set'}, "
          f"commit {machine['commit']}.  \nCommand: `{machine['command']}`\n"]
    for name, rows in results.items():
        md.append(f"\n## {name}\n\n{notes.get(name, '')}\n\n{markdown_table(rows)}")
    (out / "results.md").write_text("\n".join(md))
    if results.get("sample"):
        _plot_lines(results["sample"], "generated", "throughput_tok_s", out / "sample_throughput.png",
                    f"Sampling throughput after a {settings['prompt_len']}-token prompt (batch 1)",
                    "tokens / s")
    if results.get("memory"):
        _plot_lines(results["memory"], "context", "state_bytes", out / "memory_state.png",
                    "Inference state vs context length", "bytes")
    if results.get("scan"):
        _plot_scan(results["scan"], out / "scan_bandwidth.png")


def _plot_scan(rows: list[dict], path: Path) -> None:
    """Bars: effective fwd+bwd GB/s of each backend per shape, against the measured DRAM bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys("×".join(map(str, r["shape"])) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = [next((r["fwd_bwd_gbps"] for r in rows if r["backend"] == backend
                        and "×".join(map(str, r["shape"])) == s), 0) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], values, width, label=backend)
    ax.axhline(rows[0]["bandwidth_gbps"], color="k", ls="--", lw=1, label="DRAM bandwidth")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
    ax.set(ylabel="effective GB/s (fwd+bwd, 32 B/elem)", title="Linear scan h_t = a_t h_{t-1} + x_t")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
