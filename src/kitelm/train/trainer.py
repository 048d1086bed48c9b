"""The training loop: AdamW with weight-decay groups, warmup + decay, clipping, accumulation, periodic validation,
`metrics.jsonl`, a loss-curve PNG and atomic checkpoints with `resume="auto"`. Deterministic for a seed on CPU.

`Trainer.train` runs steps; `train_step` is one optimizer step (`forward_backward` per micro-batch, the NaN guard,
clipping, the update); `_log`, `_evaluate` and `save` are the periodic work around it. Matrix products run in the
machine's compute dtype (`kitelm.precision`: bf16 autocast where native) with fp32 weights, optimizer and loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..checkpoint import (checkpoint_dir, latest_checkpoint, load_train_state, read_weights,
                          remove_partial_checkpoints, resolve_checkpoint, save_checkpoint, verify_checkpoint)
from ..config import ModelConfig
from ..data.corpus import load_corpus
from ..data.dataset import WindowSampler, build_tokenizer, prepare_tokens, validation_windows
from ..data.tasks import TaskSampler, get_task, validation_set
from ..data.tokenizer import TaskTokenizer
from ..errors import CheckpointError, ConfigError, KitelmError
from ..evaluation import evaluate, lm_loss
from ..models import build_model
from ..plotting import saved_figure
from ..precision import autocast, dtype_name, machine_info, resolve_dtype
from ..resources import check_fits, training_bytes, writable_folder
from . import distributed
from .config import TrainConfig
from .run_folder import RunLock, claim_run_folder
from .schedule import lr_at

class TrainingDiverged(KitelmError):
    """The loss became NaN or infinite."""


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def plot_losses(rows: list[dict], path: Path, title: str) -> None:
    """Train and validation loss vs step, saved as PNG."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    with saved_figure(path) as (ax,):
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
        ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)


class Trainer:
    """Trains `model_config` under `train_config`. `log(msg)` receives progress lines; `progress=True` shows a bar.

    The run folder is locked from construction until `train()` returns (a later `train()` takes the lock again;
    `release()` frees it early); a folder that holds another run is refused unless `resume` continues it or
    `overwrite=True` replaces it.
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, resume: str | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = False, distributed_mode: str | None = None,
                 overwrite: bool = False):
        self.tc = train_config
        self.dist = distributed.setup(distributed_mode)
        if train_config.batch_size % self.dist.world:
            raise ConfigError(f"--batch-size {train_config.batch_size} is the global batch and must be divisible by "
                              f"the {self.dist.world} processes; pick a multiple of {self.dist.world}")
        main = self.dist.is_main
        self.log = (log if main else None) or (lambda msg: None)
        self.progress = progress and main
        self.compute_dtype = resolve_dtype(train_config.dtype, self.dist.device)
        self.out = Path(train_config.out_dir)
        self.lock = None
        created = not self.out.exists()
        writable_folder(self.out)
        try:
            if main:
                self.lock = RunLock(self.out)
                claim_run_folder(self.out, resuming=resume is not None, overwrite=overwrite)
            self.resume_from = self._find_resume(resume)
            torch.manual_seed(train_config.seed)
            micro_batch = train_config.batch_size // self.dist.world
            if train_config.task is not None:
                self._setup_task(train_config, micro_batch)
            else:
                self._setup_corpus(train_config, micro_batch)
            if model_config.vocab_size != self.tokenizer.vocab_size:
                model_config = model_config.replace(vocab_size=self.tokenizer.vocab_size)
            self.model_config = model_config
            self._check_memory()
        except BaseException:
            self.release()
            if created and main:  # a run that failed before it started leaves no empty folder behind
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        self.model = build_model(model_config, device=self.dist.device)  # same seed → same init on every rank
        self.wrapped = distributed.wrap(self.model, self.dist)
        self.optimizer = torch.optim.AdamW(self.model.weight_decay_groups(train_config.weight_decay),
                                           lr=train_config.lr, betas=(train_config.beta1, train_config.beta2),
                                           foreach=True)
        self.step = 0
        self.metrics: list[dict] = []
        self.metrics_path = self.out / "metrics.jsonl"
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def release(self) -> None:
        """Unlock the run folder (another process may then train into it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_memory(self) -> None:
        """Refuse, before allocating, a model and batch that cannot fit in the available memory."""
        c, tc = self.model_config, self.tc
        params = build_model(c, device="meta").num_params()
        tokens = tc.batch_size // self.dist.world * tc.seq_len
        needed = training_bytes(params, c.vocab_size, c.width, c.mlp_width, c.n_layers, tokens,
                                self.compute_dtype != torch.float32)
        check_fits(f"training {c.name} ({params / 1e6:,.1f}M parameters, {tokens:,} tokens per micro-batch)", needed,
                   "use a smaller model (--model, --set width=... n_layers=...) or a smaller --batch-size/--seq-len "
                   "(with --grad-accum for the same batch)")

    # ------------------------------------------------------------------ data
    def _setup_corpus(self, tc: TrainConfig, micro_batch: int) -> None:
        self.log("loading corpus ...")
        self.corpus = load_corpus(tc.data)
        self.fingerprint, self.data_name = self.corpus.fingerprint, self.corpus.name
        self.tokenizer = build_tokenizer(tc.tokenizer, self.corpus, log=self.log)
        self.data = prepare_tokens(self.corpus, self.tokenizer)
        sampler = WindowSampler(self.data.train, tc.seq_len, micro_batch, tc.grad_accum, world=self.dist.world,
                                seed=tc.seed)
        self.next_batch = lambda step, micro: (sampler.batch(step, micro, self.dist.rank), None)
        self.val_windows = validation_windows(self.data.validation, tc.seq_len, tc.eval_tokens)
        self.val_mask = None

    def _setup_task(self, tc: TrainConfig, micro_batch: int) -> None:
        task = get_task(tc.task)
        self.fingerprint, self.data_name = {"task": dataclasses.asdict(task)}, task.name
        self.tokenizer = TaskTokenizer(task)
        sampler = TaskSampler(task, micro_batch, tc.seed, self.dist.world)
        self.next_batch = lambda step, micro: sampler.batch(step, micro, self.dist.rank)
        n_val = max(1, tc.eval_tokens // task.seq_len)
        self.val_windows, self.val_mask = validation_set(task, n_val)

    # ------------------------------------------------------------------ resume
    def _find_resume(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            if self.dist.is_main:
                remove_partial_checkpoints(self.out)
            return latest_checkpoint(self.out)  # None: start fresh
        path = resolve_checkpoint(resume)
        verify_checkpoint(path)  # an explicit checkpoint is checked like the ones `auto` picks
        return path

    def _restore(self, path: Path) -> None:
        saved = ModelConfig.load(path / "config.json")
        if saved != self.model_config:
            diff = {k: (v, getattr(self.model_config, k)) for k, v in saved.to_dict().items()
                    if getattr(self.model_config, k) != v}
            raise CheckpointError(f"checkpoint {path} is from a different model ({diff} as saved vs requested); "
                                  "resume with the same --model/--set options or use a new --out")
        state = load_train_state(path)
        weights = read_weights(path, self.model.state_dict())
        distributed.load_full_state(self.model, self.optimizer, weights, state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.metrics_path.exists():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            self.metrics = [r for r in rows if r.get("step", 0) <= self.step]
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ one step
    def forward_backward(self, batch: torch.Tensor, mask: torch.Tensor | None, last: bool) -> float:
        """Loss and gradients of one micro-batch (gradient sync deferred to the `last` one); returns its loss share."""
        batch, mask = batch.to(self.dist.device), mask.to(self.dist.device) if mask is not None else None
        with distributed.no_grad_sync(self.wrapped, self.dist) if not last else nullcontext():
            with autocast(self.compute_dtype, self.dist.device):
                loss = lm_loss(self.wrapped, batch, mask) / self.tc.grad_accum
            loss.backward()
        return loss.item()

    def train_step(self, lr: float) -> tuple[float, torch.Tensor]:
        """One optimizer step at learning rate `lr` over `grad_accum` micro-batches → (mean loss, gradient norm).
        A NaN/inf loss raises TrainingDiverged before the update."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.tc.grad_accum
        loss = sum(self.forward_backward(*self.next_batch(self.step, micro), last=micro == accum - 1)
                   for micro in range(accum))
        loss = distributed.mean_across_ranks(loss, self.dist)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"loss became {loss} at step {self.step + 1}; training stopped before the update. "
                                   f"{self._last_good()} Lower --lr or raise --warmup-steps")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    def _last_good(self) -> str:
        latest = latest_checkpoint(self.out)
        if latest is not None:
            return f"The last good checkpoint, {latest}, is intact."
        return (f"No checkpoint was saved yet (the first is due at step {self.tc.save_every}); "
                "the run has to start again.")

    # ------------------------------------------------------------------ periodic work
    def run_metadata(self) -> dict:
        return {"kitelm": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "dtype": dtype_name(self.compute_dtype), "machine": machine_info(),
                "corpus": self.fingerprint, "tokenizer": self.tokenizer.name,
                "train_config": dataclasses.asdict(self.tc), "model": self.model_config.name,
                "params": self.model.num_params(), "non_embedding_params": self.model.num_params(True)}

    def save(self) -> Path:
        """Every rank gathers the full state (a collective under FSDP); rank 0 writes it."""
        model_state, optim_state = distributed.full_state(self.model, self.optimizer)
        path = checkpoint_dir(self.out, self.step)
        if self.dist.is_main:  # metrics first: a resume truncates them back to the checkpoint it starts from
            _write_metrics(self.metrics_path, self.metrics)
            state = {"step": self.step, "optimizer": optim_state, "rng": torch.get_rng_state()}
            path = save_checkpoint(self.out, self.step, model_state, self.model_config, self.tokenizer, state,
                                   self.run_metadata(), keep_last=self.tc.keep_last)
        distributed.barrier(self.dist)
        return path

    def validate(self) -> float:
        """Validation loss; every rank evaluates the same windows (so FSDP's collectives stay in step)."""
        total, count = evaluate(self.wrapped, self.val_windows, self.tc.batch_size, self.val_mask, self.compute_dtype)
        return total / count

    def _log(self, loss: float, lr: float, norm: torch.Tensor, tokens: int, seconds: float, elapsed: float) -> dict:
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": round(norm.item(), 4),
               "tokens": self.step * self.tc.tokens_per_step, "tokens_per_s": round(tokens / seconds, 1),
               "elapsed_s": round(elapsed, 2)}
        self.metrics.append(row)
        return row

    def _evaluate(self, say: Callable[[str], None]) -> None:
        val = self.validate()
        self.metrics.append({"step": self.step, "val_loss": val})
        say(f"step {self.step}: validation loss {val:.4f} nats/token")

    # ------------------------------------------------------------------ loop
    def train(self, until: int | None = None) -> dict:
        """Train to step `until` (default: the configured `steps`; the schedule always spans `steps`)."""
        tc = self.tc
        until = tc.steps if until is None else min(until, tc.steps)
        if self.dist.is_main and self.lock is None:
            self.lock = RunLock(self.out)
        if self.dist.is_main:
            (self.out / "run.json").write_text(json.dumps(self.run_metadata(), indent=2) + "\n")
        self.model.train()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True)
        say = bar.write if bar is not None else self.log
        t_start = t_since = time.perf_counter()
        tokens_since = 0
        try:
            while self.step < until:
                lr = lr_at(self.step, tc.lr, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
                loss, norm = self.train_step(lr)
                self.step += 1
                tokens_since += tc.tokens_per_step
                if self.step % tc.log_every == 0 or self.step == until:
                    now = time.perf_counter()
                    row = self._log(loss, lr, norm, tokens_since, now - t_since, now - t_start)
                    tokens_since, t_since = 0, now
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if self.step % tc.eval_every == 0 or self.step == until:
                    self._evaluate(say)
                    t_since = time.perf_counter()  # evaluation time is not training throughput
                if self.step % tc.save_every == 0 or self.step == until:
                    self.save()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if self.metrics and self.dist.is_main:
                _write_metrics(self.metrics_path, self.metrics)
                plot_losses(self.metrics, self.out / "loss.png", f"{self.model_config.name} on {self.data_name}")
            self.release()
        last = [r for r in self.metrics if "val_loss" in r]
        return {"step": self.step, "val_loss": last[-1]["val_loss"] if last else None,
                "checkpoint": str(latest_checkpoint(self.out)), "elapsed_s": round(time.perf_counter() - t_start, 1)}
