"""The training loop: AdamW with weight-decay groups, warmup + decay, clipping, accumulation, periodic validation,
`metrics.jsonl`, a loss-curve PNG and atomic checkpoints with `resume="auto"`. Deterministic for a seed on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import __version__
from ..config import ModelConfig
from ..data.corpus import load_corpus
from ..data.dataset import WindowSampler, build_tokenizer, prepare_tokens, validation_windows
from ..data.tasks import TaskSampler, TaskTokenizer, get_task, validation_set
from ..errors import CheckpointError, ConfigError, KitelmError
from ..models import build_model
from . import distributed
from ..checkpoint import checkpoint_dir, latest_checkpoint, remove_partial_checkpoints, load_train_state, read_weights, resolve_checkpoint, save_checkpoint
from .schedule import lr_at

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    data: str | None = None  # None = the Python standard library corpus
    task: str | None = None  # a synthetic task (kitelm.data.tasks) instead of a corpus
    tokenizer: str = "byte"  # byte | bpe:N
    # The defaults are the main job (`kitelm train`): transformer-mini, ~8 minutes on 2 CPU cores.
    steps: int = 320
    batch_size: int = 32  # global sequences per micro-batch (split across processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 160
    eval_tokens: int = 32_768  # validation tokens per periodic evaluation
    save_every: int = 160
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid training option: {msg}")

        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_tokens", "save_every",
                     "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name}={getattr(self, name)!r} must be a positive integer")
        need(self.lr > 0, f"lr={self.lr} must be positive")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; choose one of {list(SCHEDULES)}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        need(self.keep_last >= 1, f"keep_last={self.keep_last} must be at least 1")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


class TrainingDiverged(KitelmError):
    """The loss became NaN or infinite."""


def token_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats) of `batch [B, T+1]` at every position: [B, T]."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")


def lm_loss(model, batch: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of `batch [B, T+1]`, over the targets where `mask [B, T]` is True (all if None)."""
    if mask is None:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return token_losses(model, batch)[mask].mean()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16, mask: torch.Tensor | None = None
             ) -> tuple[float, int]:
    """Total next-token loss (nats) and scored-token count over `windows [N, T+1]` (targets where `mask`)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(windows), batch_size):
        losses = token_losses(model, windows[i: i + batch_size].to(device))
        if mask is not None:
            losses = losses[mask[i: i + batch_size].to(device)]
        total += losses.sum().item()
        count += losses.numel()
    model.train(was_training)
    return total, count


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def plot_losses(rows: list[dict], path: Path, title: str) -> None:
    """Train and validation loss vs step, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Trainer:
    """Trains `model_config` under `train_config`. `log(msg)` receives progress lines; `progress=True` shows a bar."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, resume: str | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = False, distributed_mode: str | None = None):
        self.tc = train_config
        self.dist = distributed.setup(distributed_mode)
        if train_config.batch_size % self.dist.world:
            raise ConfigError(f"--batch-size {train_config.batch_size} is the global batch and must be divisible by "
                              f"the {self.dist.world} processes; pick a multiple of {self.dist.world}")
        main = self.dist.is_main
        self.log = (log if main else None) or (lambda msg: None)
        self.progress = progress and main
        self.out = Path(train_config.out_dir)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise KitelmError(f"output folder {self.out} is not writable ({err.strerror}); "
                              "choose another --out") from None
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

    # ------------------------------------------------------------------ data
    def _setup_corpus(self, tc: TrainConfig, micro_batch: int) -> None:
        self.log("loading corpus ...")
        self.corpus = load_corpus(tc.data)
        self.fingerprint, self.data_name = self.corpus.fingerprint, self.corpus.name
        self.tokenizer = build_tokenizer(tc.tokenizer, self.corpus)
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
        return resolve_checkpoint(resume)

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

    # ------------------------------------------------------------------ loop
    def run_metadata(self) -> dict:
        return {"kitelm": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
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
        total, count = evaluate(self.wrapped, self.val_windows, self.tc.batch_size, self.val_mask)
        return total / count

    def train(self, until: int | None = None) -> dict:
        """Train to step `until` (default: the configured `steps`; the schedule always spans `steps`)."""
        tc = self.tc
        until = tc.steps if until is None else min(until, tc.steps)
        if self.dist.is_main:
            (self.out / "run.json").write_text(json.dumps(self.run_metadata(), indent=2) + "\n")
        self.model.train()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True)
        t_start, tokens_since, t_since = time.perf_counter(), 0, time.perf_counter()
        try:
            while self.step < until:
                lr = lr_at(self.step, tc.lr, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(tc.grad_accum):
                    batch, mask = self.next_batch(self.step, micro)
                    batch, mask = batch.to(self.dist.device), mask.to(self.dist.device) if mask is not None else None
                    last = micro == tc.grad_accum - 1
                    with distributed.no_grad_sync(self.wrapped, self.dist) if not last else nullcontext():
                        loss = lm_loss(self.wrapped, batch, mask) / tc.grad_accum
                        loss.backward()
                    loss_sum += loss.item()
                loss_sum = distributed.mean_across_ranks(loss_sum, self.dist)
                if not math.isfinite(loss_sum):
                    raise TrainingDiverged(
                        f"loss became {loss_sum} at step {self.step}; training stopped before the update, the last "
                        f"checkpoint in {self.out / 'checkpoints'} is intact; lower --lr or raise --warmup-steps")
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                tokens_since += tc.tokens_per_step
                if self.step % tc.log_every == 0 or self.step == until:
                    now = time.perf_counter()
                    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
                    row = {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": round(norm.item(), 4),
                           "tokens": self.step * tc.tokens_per_step,
                           "tokens_per_s": round(tokens_since / (now - t_since), 1),
                           "elapsed_s": round(now - t_start, 2)}
                    self.metrics.append(row)
                    tokens_since, t_since = 0, now
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if self.step % tc.eval_every == 0 or self.step == until:
                    val = self.validate()
                    self.metrics.append({"step": self.step, "val_loss": val})
                    (bar.write if bar is not None else self.log)(f"step {self.step}: validation loss {val:.4f} nats/token")
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
        last = [r for r in self.metrics if "val_loss" in r]
        return {"step": self.step, "val_loss": last[-1]["val_loss"] if last else None,
                "checkpoint": str(latest_checkpoint(self.out)), "elapsed_s": round(time.perf_counter() - t_start, 1)}
