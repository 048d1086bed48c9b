"""The experiments of `kitelm reproduce`: each reuses a kitelm piece, writes its figures into its folder and returns
the data its claims are judged on (`claims.py`), with the corpus it ran on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ...evaluation import evaluate_checkpoint
from ...plotting import saved_figure, smoothed
from ...presets import get_preset, preset_rows
from ...train.trainer import Trainer
from ..bench import run_bench
from ..settings import BenchSettings, ReproduceScale, StudyRecipe
from ..study import run_block_study
from .claims import (claims_blocks, claims_extrapolation, claims_memory, claims_params, claims_sampling,
                     claims_tasks, claims_throughput)


def _run_json(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def exp_params(scale: ReproduceScale, out: Path, log) -> dict:
    wanted = {p for _, p in scale.block_variants} | set(scale.paper_sizes)
    return {"corpus": None, "rows": [r for r in preset_rows() if r["model"] in wanted]}


def exp_blocks(scale: ReproduceScale, out: Path, log) -> dict:
    recipe = scale.recipe(eval_points=5, eval_tokens=16 * scale.batch_size * scale.seq_len)
    results = run_block_study(out, recipe, scale.block_variants, log)
    first = results["variants"][0]["preset"]
    return {"corpus": _run_json(out / first / "seed-0")["corpus"], "study": results}


def _bench(name: str, settings: BenchSettings, out: Path, log) -> dict:
    return {"corpus": "random tokens", "rows": run_bench([name], out, settings, log)[name]}


def exp_throughput(scale: ReproduceScale, out: Path, log) -> dict:
    return _bench("train", scale.bench(train_models=list(scale.throughput_models), peers=False), out, log)


def exp_memory(scale: ReproduceScale, out: Path, log) -> dict:
    return _bench("memory", scale.bench(memory_models=list(scale.memory_models),
                                        memory_lengths=list(scale.memory_lengths), rss_max_len=scale.rss_max_len),
                  out, log)


def exp_sampling(scale: ReproduceScale, out: Path, log) -> dict:
    return _bench("sample", scale.bench(sample_models=list(scale.sample_models), prompt_len=scale.prompt_len,
                                        lengths=list(scale.sample_lengths), peers=False), out, log)


def exp_extrapolation(scale: ReproduceScale, out: Path, log) -> dict:
    recipe = scale.recipe(eval_points=2, eval_tokens=8 * scale.batch_size * scale.seq_len)
    runs = {}
    for label, preset in scale.lm_models:
        log(f"extrapolation: training {label} ({preset}), {scale.steps} steps at context {scale.seq_len}")
        Trainer(get_preset(preset), recipe.train_config(out / preset, seed=0), overwrite=True).train()
        runs[label] = evaluate_checkpoint(out / preset, out=out / preset / "eval", extrapolate=4,
                                          max_tokens=8 * scale.batch_size * scale.seq_len,
                                          max_windows=scale.eval_windows)
    _plot_curves({k: r["loss_by_position"] for k, r in runs.items()}, scale.seq_len, out / "extrapolation.png")
    return {"corpus": next(iter(runs.values()))["corpus"],
            "runs": {k: {key: r[key] for key in ("loss", "train_len", "loss_by_segment")} for k, r in runs.items()}}


def exp_tasks(scale: ReproduceScale, out: Path, log) -> dict:
    recipe = StudyRecipe(steps=scale.task_steps, batch_size=scale.batch_size, lr=scale.task_lr, eval_points=10,
                         eval_tokens=8192, dtype=scale.dtype)
    results: dict[str, dict] = {}
    for task in scale.tasks:
        for label, config in scale.task_configs():
            log(f"tasks: training {label} ({config.name}) on {task}, {scale.task_steps} steps at LR {scale.task_lr:g}")
            folder = out / task / label.lower()
            trainer = Trainer(config, replace(recipe.train_config(folder, seed=0), task=task),
                              overwrite=True)  # an interrupted experiment's runs start again
            trainer.train()
            r = evaluate_checkpoint(folder, out=folder / "eval")
            curve = [(m["step"], m["val_loss"]) for m in trainer.metrics if "val_loss" in m]
            results.setdefault(task, {})[label] = {"model": config.name, "loss": r["loss"], "accuracy": r["accuracy"],
                                                   "curve": curve}
    _plot_tasks(results, out / "tasks.png")
    return {"corpus": "synthetic tasks (kitelm.data.tasks), generated in-process", "results": results}


def _plot_curves(curves: dict[str, list[float]], train_len: int, path: Path) -> None:
    """Loss by position of several models on one plot (`plotting.smoothed`)."""
    with saved_figure(path) as (ax,):
        for label, curve in curves.items():
            ax.plot(*smoothed(curve), lw=1.2, label=label)
        ax.axvline(train_len, color="k", ls="--", lw=1, label=f"training length {train_len}")
        ax.set(xlabel="position in context (tokens)", ylabel="loss (nats/token)", title="Length extrapolation")


def _plot_tasks(results: dict[str, dict], path: Path) -> None:
    """Validation answer loss vs step, one panel per task."""
    with saved_figure(path, panels=len(results), size=(5 * len(results), 4), legend_fontsize=8) as axes:
        for ax, (task, models) in zip(axes, results.items()):
            for label, r in models.items():
                ax.plot(*zip(*r["curve"]), "o-", ms=3, label=f"{label} ({100 * r['accuracy']:.0f} %)")
            ax.set(title=task, xlabel="step", ylabel="answer loss (nats)")


EXPERIMENTS: dict[str, tuple[Callable, Callable]] = {
    "params": (exp_params, claims_params), "blocks": (exp_blocks, claims_blocks),
    "throughput": (exp_throughput, claims_throughput), "memory": (exp_memory, claims_memory),
    "sampling": (exp_sampling, claims_sampling), "extrapolation": (exp_extrapolation, claims_extrapolation),
    "tasks": (exp_tasks, claims_tasks)}
FIGURES = {"blocks": ["loss_vs_step.png", "loss_vs_time.png"], "memory": ["memory_state.png"],
           "sampling": ["sample_throughput.png"], "extrapolation": ["extrapolation.png"], "tasks": ["tasks.png"]}
