"""Held-out evaluation in units that compare across tokenizers and with classical compressors.

bits per byte = Σ next-token loss (nats) / (ln 2 · UTF-8 bytes of the text those tokens encode).
gzip -9 and xz -9 (Python's `gzip` / `lzma`, the same algorithms and levels) compress exactly that text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.dataset import validation_windows
from .errors import KitelmError
from .plotting import saved_figure, smoothed
from .precision import autocast, dtype_name, machine_info, resolve_dtype
from .resources import writable_folder


def token_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats) of `batch [B, T+1]` at every position: [B, T] (the model's logits are fp32)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")


def lm_loss(model, batch: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of `batch [B, T+1]`, over the targets where `mask [B, T]` is True (all if None)."""
    if mask is None:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return token_losses(model, batch)[mask].mean()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16, mask: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """Total next-token loss (nats) and scored-token count over `windows [N, T+1]` (targets where `mask`), with
    matrix products in `dtype` (autocast; the loss is summed in fp32)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with autocast(dtype, device):
        for i in range(0, len(windows), batch_size):
            losses = token_losses(model, windows[i: i + batch_size].to(device))
            if mask is not None:
                losses = losses[mask[i: i + batch_size].to(device)]
            total += losses.sum().item()
            count += losses.numel()
    model.train(was_training)
    return total, count


XZ_GIVEN = "xz -9 given train"
CACHED_XZ_BYTES = 1 << 20  # xz sizes of inputs at least this long are cached (xz -9 runs at ~1.3 MB/s per thread)
XZ_CONTEXT_MAX = 48 << 20  # a longer training split gets no "given train" figure: xz -9 sees only its last 64 MiB,
#                            and each of its compressions would take over 40 s
WHOLE_SPLIT_MAX_TOKENS = 1 << 21  # the report evaluates the whole validation split up to this many tokens


def xz_cache_path(data: bytes) -> Path:
    from .data.dataset import cache_root

    return cache_root() / "xz9" / f"{hashlib.sha256(data).hexdigest()}.json"


def xz_size(data: bytes) -> int:
    """Bytes of `lzma.compress(data, preset=9)`; for a long input cached under the kitelm cache by its sha256 (the
    11.7 MB training split of the default corpus takes ~9 s to compress, every run would pay it)."""
    if len(data) < CACHED_XZ_BYTES:
        return len(lzma.compress(data, preset=9))
    path = xz_cache_path(data)
    try:
        cached = json.loads(path.read_text())
        if cached["bytes"] == len(data):
            return int(cached["xz9"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    size = len(lzma.compress(data, preset=9))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"bytes": len(data), "xz9": size}) + "\n")
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the time next run
        pass
    return size


def xz_sizes(inputs: list[bytes]) -> list[int]:
    """`xz_size` of each input, compressed in parallel threads (lzma releases the GIL)."""
    if len(inputs) <= 1:
        return [xz_size(data) for data in inputs]
    with ThreadPoolExecutor(max_workers=min(len(inputs), os.cpu_count() or 1)) as pool:
        return list(pool.map(xz_size, inputs))


def compressor_bits_per_byte(data: bytes, context: bytes | None = None) -> dict[str, float]:
    """gzip -9 and xz -9 bits per byte of `data`; with `context` (the training text) also what xz -9 pays for `data`
    after it has seen the context: 8 · (|xz(context + data)| − |xz(context)|) / |data|, a compressor that has
    'trained' on the same text as the model."""
    out = {"gzip -9": 8 * len(gzip.compress(data, compresslevel=9)) / len(data)}
    if context is None:
        out["xz -9"] = 8 * xz_size(data) / len(data)
        return out
    alone, with_context, context_only = xz_sizes([data, context + data, context])
    out["xz -9"] = 8 * alone / len(data)
    out[XZ_GIVEN] = 8 * (with_context - context_only) / len(data)
    return out


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 16, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """Summed next-token loss (nats, float64) of each window of `windows [N, T+1]`: [N]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = []
    with autocast(dtype, device):
        for i in range(0, len(windows), batch_size):
            sums.append(token_losses(model, windows[i: i + batch_size].to(device)).double().sum(1).cpu())
    model.train(was_training)
    return torch.cat(sums)


def evaluate_bits_per_byte(model, tokens: np.ndarray, tokenizer, seq_len: int, max_tokens: int | None = None,
                           batch_size: int = 16, dtype: torch.dtype = torch.float32, context: bytes | None = None,
                           whole_split: bool = False) -> dict:
    """Loss over consecutive windows of the first `max_tokens` tokens, in nats/token and bits/byte, with gzip and xz
    on the text of the same target tokens (and xz given `context`, the training text, if passed). With
    `whole_split`, result["whole"] holds the same figures for every window of `tokens` (one pass over the model:
    the first windows are the slice's)."""
    windows = validation_windows(tokens, seq_len, None if whole_split else max_tokens)
    n_slice = len(validation_windows(tokens, seq_len, max_tokens)) if whole_split else len(windows)
    sums = window_losses(model, windows, batch_size, dtype)

    counts = [n_slice, len(windows)] if whole_split else [n_slice]
    texts = [tokenizer.decode(windows[:n, 1:].reshape(-1).tolist()).encode("utf-8") for n in counts]
    if context is not None:  # the long compressions at once, in parallel; compressor_bits_per_byte then reads cache
        xz_sizes([context] + [context + data for data in texts if len(context + data) >= CACHED_XZ_BYTES])

    def figures(n: int, data: bytes) -> dict:
        total, count = float(sums[:n].sum()), n * seq_len
        return {"loss": total / count, "tokens": count, "bytes": len(data),
                "bits_per_byte": total / (math.log(2) * len(data)), **compressor_bits_per_byte(data, context)}

    result = figures(counts[0], texts[0])
    if whole_split:
        result["whole"] = figures(counts[1], texts[1])
    return result


@torch.no_grad()
def loss_by_position(model, tokens: np.ndarray, length: int, max_windows: int = 64, batch_size: int = 4,
                     dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Mean next-token loss at each position 0..length-1 over up to `max_windows` consecutive windows: how well the
    model uses (or extrapolates to) long contexts."""
    windows = validation_windows(tokens, length)[:max_windows]
    model.eval()
    total = torch.zeros(length, dtype=torch.float64)
    with autocast(dtype, next(model.parameters()).device):
        for i in range(0, len(windows), batch_size):
            total += token_losses(model, windows[i: i + batch_size]).double().sum(0)
    return (total / len(windows)).numpy()


def _plot_positions(curve: np.ndarray, train_len: int, path: Path, title: str) -> None:
    """Loss by position (`plotting.smoothed`), the training length marked."""
    xs, ys = smoothed(curve)
    with saved_figure(path) as (ax,):
        ax.plot(xs, ys, lw=1.2)
        ax.axvline(train_len, color="k", ls="--", lw=1, label=f"training length {train_len}")
        ax.set(xlabel="position in context (tokens)", ylabel="loss (nats/token)", title=title)
        ax.set_ylim(top=float(np.percentile(ys, 99)) * 1.05)


def default_eval_folder(checkpoint: Path) -> Path:
    """RUN/eval/step-N for a checkpoint of a run, else a folder beside the checkpoint: an evaluation never writes
    into a checkpoint."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / checkpoint.name
    return checkpoint.with_name(checkpoint.name + "-eval")


def evaluate_checkpoint(path: str | Path, data: str | None = None, out: str | Path | None = None,
                        extrapolate: int = 4, max_tokens: int | None = 131_072, max_windows: int = 32,
                        dtype: str | torch.dtype | None = "auto", log=lambda msg: None) -> dict:
    """Validation loss and bits per byte at the training length, and loss by position up to `extrapolate` × the
    training length, with matrix products in `dtype` ('auto': bf16 autocast where native). Writes `eval.json` and
    `loss_by_position.png` into `out` (default: `default_eval_folder`)."""
    from . import load
    from .data.corpus import load_corpus
    from .data.dataset import prepare_tokens

    for name, value in (("extrapolate", extrapolate), ("max_tokens", max_tokens), ("windows", max_windows)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise KitelmError(f"--{name.replace('_', '-')} {value} must be a positive integer")
    compute = resolve_dtype(dtype)
    if out is not None:  # checked before the model is loaded
        out = writable_folder(out)
    lm = load(path, dtype="float32")
    out = out if out is not None else writable_folder(default_eval_folder(lm.path))
    if lm.tokenizer.name.startswith("task:"):
        return evaluate_task_checkpoint(lm, out, dtype=compute)
    meta_file = lm.path / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    train_cfg = meta.get("train_config", {})
    train_len = int(train_cfg.get("seq_len", lm.config.max_seq_len))
    corpus = load_corpus(data if data is not None else train_cfg.get("data"))
    log(f"evaluating {lm.path} on {corpus.name} (training length {train_len})")
    tokens = prepare_tokens(corpus, lm.tokenizer).validation
    result = {"checkpoint": str(lm.path), "corpus": corpus.fingerprint, "train_len": train_len,
              "dtype": dtype_name(compute), "machine": machine_info(),
              **evaluate_bits_per_byte(lm.model, tokens, lm.tokenizer, train_len, max_tokens, dtype=compute)}
    curve = loss_by_position(lm.model, tokens, extrapolate * train_len, max_windows, dtype=compute)
    result["loss_by_position"] = [round(float(v), 5) for v in curve]
    result["loss_by_segment"] = {f"{k}-{k + 1}×": float(curve[k * train_len:(k + 1) * train_len].mean())
                                 for k in range(extrapolate)}
    result["out"] = str(out)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot_positions(curve, train_len, out / "loss_by_position.png",
                    f"{lm.config.name}: loss by position ({len(curve)} tokens)")
    return result


def evaluate_task_checkpoint(lm, out: Path, n_samples: int = 512, dtype: torch.dtype = torch.float32) -> dict:
    """Loss on answer tokens and exact-match accuracy of a synthetic-task checkpoint on its validation samples."""
    from .data.tasks import task_accuracy, validation_set

    task = lm.tokenizer.task
    tokens, mask = validation_set(task, n_samples)
    total, count = evaluate(lm.model, tokens, 64, mask, dtype)
    result = {"checkpoint": str(lm.path), "task": task.name, "samples": n_samples, "loss": total / count,
              "accuracy": task_accuracy(lm.model, tokens, mask)}
    result["out"] = str(out)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
