"""`kitelm reproduce`: the papers' claims measured at CPU scale on the user's machine, written to `REPORT.md` + PNGs.

Every experiment reuses a kitelm piece and writes `DIR/<name>/result.json`; a finished experiment is skipped, so an
interrupted run resumes where it stopped. Each result records the command, commit, machine and corpus fingerprint.

| experiment | reuses | claim |
|---|---|---|
| params | `presets.preset_rows` | SAS / SAS-P remove W^V, W^P: 12d² → 10d² per block (He & Hofmann §4.2) |
| blocks | `study.run_block_study` | SAS / SAS-P match Pre-LN per step (Fig. 26) and train faster (Table 1) |
| throughput | `bench.run_bench(["train"])` | Griffin trains as fast as a Transformer |
| memory | `bench.run_bench(["memory"])` | Griffin's state is bounded; the KV cache grows with context |
| sampling | `bench.run_bench(["sample"])` | Griffin's sampling throughput is flat in generation length (RG Fig. 1a) |
| extrapolation | `Trainer` + `evaluation.evaluate_checkpoint` | Griffin extrapolates beyond its training length |
| tasks | `Trainer --task` + `evaluate_checkpoint` | Hawk learns copying / induction slowly, Griffin fast (§6) |

Split by concern: `plan.py` (the budget → the experiments' sizes, `settings.ReproduceScale`), `runs.py` (the
experiments), `claims.py` (verdict rules: holds / partly / does not, or inconclusive where the run was too short to
say), `report.py` (REPORT.md and publishing it into the README).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ...errors import KitelmError
from .. import machine
from ..settings import ReproduceScale
from .plan import REFERENCE_MINUTES, plan
from .report import publish, write_report
from .runs import EXPERIMENTS

__all__ = ["EXPERIMENTS", "publish", "run_reproduce", "write_report"]


def run_reproduce(out_dir: str | Path = "runs/reproduce", budget_minutes: float = REFERENCE_MINUTES,
                  scale: ReproduceScale | None = None, log: Callable[[str], None] = print, dtype: str = "auto") -> Path:
    """Run every experiment not finished yet in `out_dir`, then write `REPORT.md`; returns its path. `scale`
    replaces the budget's plan (tests use tiny presets and steps); `dtype` is the plan's compute dtype."""
    from tqdm import tqdm

    if budget_minutes <= 0:
        raise KitelmError(f"--budget-minutes {budget_minutes:g} must be positive")
    out = Path(out_dir)
    todo = [n for n in EXPERIMENTS if not (out / n / "result.json").exists()]
    if todo and scale is None:
        scale = plan(budget_minutes, dtype=dtype)
    info = {**machine.describe(), "dtype": scale.dtype if scale is not None else dtype, **machine.measured_peaks()}
    with tqdm(total=len(EXPERIMENTS), unit="experiment", dynamic_ncols=True) as bar:
        for name, (experiment, claims) in EXPERIMENTS.items():
            bar.set_description(name)
            if name in todo:
                folder = out / name
                folder.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                data = experiment(scale, folder, bar.write)
                record = {"experiment": name, "command": info["command"], "commit": info["commit"], "machine": info,
                          "corpus": data.pop("corpus"), "scale": asdict(scale),
                          "seconds": round(time.perf_counter() - start, 1), "data": data, "claims": claims(data)}
                tmp = folder / "result.json.tmp"
                tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
                tmp.replace(folder / "result.json")  # written last: its presence means the experiment finished
            else:
                bar.write(f"{name}: finished earlier, skipped ({out / name / 'result.json'})")
            bar.update(1)
    return write_report(out)
