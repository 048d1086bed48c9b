"""Architecture studies: train several presets under one recipe and compare them (`kitelm study blocks`).

The blocks study reproduces, at CPU scale, the comparison of He & Hofmann 2023 (Figs. 5 and 26): Pre-LN, Parallel,
SAS, SAS-P and SAS-P without norm trained for the same steps and tokens over several seeds, with the reference's
optimiser (App. D.1). Griffin (`griffin-small`) and Griffin-SAS (`griffin-sas-small`, the SAS attention as Griffin's
local attention block) follow in the same run and table, so the one command
`kitelm study blocks` compares both the paper's blocks and the simplified attention inside Griffin's block pattern.
It writes `results.json`, `results.md` (parameters, final validation loss mean ± std, training tokens/s) and
`loss_vs_step.png`, `loss_vs_time.png`. Wall-clock is training time only: evaluation and checkpointing are left out,
as in the trainer's tokens/s. The variants are `settings.BLOCK_VARIANTS`, the recipe `settings.StudyRecipe`.
"""

from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..plotting import saved_figure
from ..presets import get_preset
from ..train.trainer import Trainer
from .settings import BLOCK_VARIANTS, StudyRecipe


def _curves(metrics: list[dict]) -> dict:
    """Validation loss against step and against cumulative training seconds (evaluation time excluded). Training time
    is known at logged steps; an evaluation between two of them is placed at the interval's constant rate."""
    steps, seconds, tokens = [0], [0.0], 0
    for row in metrics:
        if "tokens_per_s" in row:
            seconds.append(seconds[-1] + (row["tokens"] - tokens) / row["tokens_per_s"])
            steps.append(row["step"])
            tokens = row["tokens"]
    val = [r for r in metrics if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
    return {"step": [r["step"] for r in val],
            "train_s": [round(_interpolate(r["step"], steps, seconds), 3) for r in val],
            "val_loss": [r["val_loss"] for r in val],
            # the median interval is robust to the first (warm-up) interval and to other load on a shared machine
            "tokens_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates)}


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through the increasing points xs (held constant beyond the last)."""
    i = bisect.bisect_left(xs, x)
    if i >= len(xs):
        return ys[-1]
    if xs[i] == x or i == 0:
        return ys[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_block_study(out_dir: str | Path, recipe: StudyRecipe | None = None,
                    variants: tuple[tuple[str, str], ...] = BLOCK_VARIANTS,
                    log: Callable[[str], None] | None = None) -> dict:
    """Train every (label, preset) in `variants` for `recipe.seeds` seeds; write and return the results."""
    recipe = recipe or StudyRecipe()
    if recipe.seeds < 1 or recipe.steps < 1:
        raise ConfigError(f"the study needs at least 1 step and 1 seed (got steps={recipe.steps}, "
                          f"seeds={recipe.seeds})")
    log = log or (lambda msg: None)
    out = Path(out_dir)
    results = {"recipe": asdict(recipe), "variants": []}
    for label, preset in variants:
        runs = []
        for seed in range(recipe.seeds):
            trainer = Trainer(get_preset(preset), recipe.train_config(out / preset / f"seed-{seed}", seed),
                              overwrite=True)  # a rerun study trains every variant afresh
            log(f"{label} ({preset}), seed {seed}: {recipe.steps} steps × {trainer.tc.tokens_per_step:,} tokens")
            trainer.train()
            runs.append(_curves(trainer.metrics))
        final = _mean_std([r["val_loss"][-1] for r in runs])
        speed = _mean_std([r["tokens_per_s"] for r in runs])
        model = trainer.model
        results["variants"].append({
            "label": label, "preset": preset, "params": model.num_params(),
            "non_embedding_params": model.num_params(non_embedding=True),
            "final_val_loss": final[0], "final_val_loss_std": final[1], "tokens_per_s": speed[0],
            "tokens_per_s_std": speed[1], "tokenizer": trainer.tokenizer.name, "runs": runs})
        log(f"{label}: final validation loss {_with_spread(*final, recipe.seeds)}, {speed[0]:,.0f} tokens/s")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results) + "\n")
    _plot(results, "step", "step", out / "loss_vs_step.png")
    _plot(results, "train_s", "training time (s, evaluation excluded)", out / "loss_vs_time.png")
    return results


def _with_spread(mean: float, std: float, seeds: int) -> str:
    """`mean ± std` over seeds; the mean alone for one seed (whose spread is unknown, not zero)."""
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def results_table(results: dict) -> str:
    """Markdown table: parameters, non-embedding parameters (change vs the first row), loss, tokens/s (ratio)."""
    rows = results["variants"]
    base = rows[0]
    r = results["recipe"]
    lines = [f"{r['steps']} steps × {r['batch_size']}×{r['seq_len']} tokens, {r['seeds']} seed(s), peak LR {r['lr']}",
             "",
             "| block | preset | params | non-embedding params | final val loss (nats) | Δ vs first | tokens/s | speed |",
             "|---|---|---|---|---|---|---|---|"]
    for v in rows:
        change = v["non_embedding_params"] / base["non_embedding_params"] - 1
        lines.append(
            f"| {v['label']} | `{v['preset']}` | {v['params'] / 1e6:.2f}M | {v['non_embedding_params'] / 1e6:.2f}M "
            f"({100 * change:+.1f}%) | {_with_spread(v['final_val_loss'], v['final_val_loss_std'], r['seeds'])} | "
            f"{v['final_val_loss'] - base['final_val_loss']:+.4f} | {v['tokens_per_s']:,.0f} | "
            f"{v['tokens_per_s'] / base['tokens_per_s']:.2f}× |")
    return "\n".join(lines)


def _plot(results: dict, x_key: str, x_label: str, path: Path) -> None:
    """Mean validation loss over seeds (band: min to max) against `x_key` ("step" or "train_s")."""
    with saved_figure(path) as (ax,):
        for v in results["variants"]:
            runs = v["runs"]
            n = min(len(r["val_loss"]) for r in runs)
            x = [statistics.fmean(r[x_key][i] for r in runs) for i in range(n)]
            losses = [[r["val_loss"][i] for r in runs] for i in range(n)]
            ax.plot(x, [statistics.fmean(col) for col in losses], "o-", lw=1.5, ms=3, label=v["label"])
            if len(runs) > 1:
                ax.fill_between(x, [min(col) for col in losses], [max(col) for col in losses], alpha=0.2)
        ax.set(xlabel=x_label, ylabel="validation loss (nats/token)", title="Simplified transformer blocks")
