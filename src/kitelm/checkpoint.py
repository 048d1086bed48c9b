"""Checkpoints that survive crashes.

Layout: `RUN/checkpoints/step-XXXXXXXX/` holding `model.safetensors`, `config.json`, `tokenizer.json`,
`train_state.pt` (optimizer, RNG, step; loaded with `weights_only=True`), `meta.json` and `manifest.json` (sha256 and
size of every other file, written last). A checkpoint is written into a hidden temporary folder, fsynced, then
renamed into place, so a crash leaves either the complete new checkpoint or none. Loading verifies the manifest;
`latest_checkpoint` skips (with a warning) any checkpoint that fails verification.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, KitelmError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
PREFIX = "step-"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(final: Path, fill: Callable[[Path], None], replace: bool = False) -> None:
    """Create the checkpoint folder `final` atomically. `fill(tmp)` writes its files into a hidden temporary folder
    beside it; then `manifest.json` (sha256 and size of every file) is added, the files and the folder are fsynced,
    and the folder is renamed into place. An existing `final` is replaced with `replace` (the old copy moved aside
    first), else refused with KitelmError. On any error the temporary folder is removed; OSErrors reach the caller,
    which says what could not be written."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fill(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        for p in tmp.iterdir():
            fsync_path(p)
        fsync_path(tmp)
        if final.exists():
            if not replace:
                raise KitelmError(f"{final} appeared while it was being written; nothing was written there")
            old = parent / f".old-{final.name}-{os.getpid()}"  # re-saving a step (e.g. after resume)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(folder: Path, model_state: dict[str, torch.Tensor], config, tokenizer, **metadata: str) -> None:
    """`model.safetensors` (with `metadata`), `config.json` and the tokenizer's files into `folder`."""
    state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(state, folder / MODEL_FILE, metadata={"format": "pt", "kitelm_arch": config.arch, **metadata})
    config.save(folder / CONFIG_FILE)
    tokenizer.save(folder)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], config, tokenizer,
                    train_state: dict | None = None, meta: dict | None = None, keep_last: int | None = None) -> Path:
    """Write checkpoint `step` (a full model state dict, its config and tokenizer, optionally the training state)
    atomically, and keep only the newest `keep_last` complete checkpoints."""
    final = checkpoint_dir(run_dir, step)
    parent = final.parent

    def fill(tmp: Path) -> None:
        write_model(tmp, model_state, config, tokenizer)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **(meta or {})}, indent=2) + "\n")

    try:
        write_folder(final, fill, replace=True)
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {final} ({err.strerror or err}); free disk space or "
                              "choose a writable --out folder (earlier checkpoints are untouched)") from None
    if keep_last:  # rename out of sight first: a crash mid-delete never leaves a half-deleted step-* folder
        for old in list_checkpoints(run_dir)[:-keep_last]:
            doomed = parent / f".old-{old.name}-{os.getpid()}"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete (renamed-into-place) checkpoint folders of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete temporary folders that a killed writer left behind (never a renamed, complete checkpoint)."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest exists with its size and sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}; it is not a complete kitelm checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path / MANIFEST_FILE} is corrupt (not JSON)") from None
    well_formed = isinstance(manifest, dict) and MODEL_FILE in manifest and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
        for e in manifest.values())
    if not well_formed:
        raise CheckpointError(f"{path / MANIFEST_FILE} is corrupt: it must map every file (at least {MODEL_FILE}) to "
                              "its sha256 and bytes")
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt (checksum mismatch)")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes verification; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (→ its newest valid checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run folder or a checkpoint folder")
    if (path / MANIFEST_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint; pass a run folder written by `kitelm train` "
                              "or a checkpoint folder with model.safetensors and config.json")
    return latest


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load `model.safetensors` into `model` strictly (see `read_weights`)."""
    model.load_state_dict(read_weights(path, model.state_dict()))


def read_weights(path: str | Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read `model.safetensors`; missing, unexpected or mis-shaped tensors (against `expected`) raise
    CheckpointError naming them."""
    file = Path(path) / MODEL_FILE
    try:
        state = load_file(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist") from None
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err})") from None
    check_state(state, expected, str(file), "the model in config.json")
    return state


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, target: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped tensor of `state` (read from
    `source`) against the state dict `expected` (of `target`)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = [_listing("missing", missing), _listing("unexpected", unexpected), _listing("mis-shaped", shapes)]
        raise CheckpointError(f"{source} does not fit {target}: " + "; ".join(p for p in parts if p))


def _listing(kind: str, names: list[str], limit: int = 10) -> str:
    if not names:
        return ""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} {kind} {names[:limit]}{more}"


def load_train_state(path: str | Path) -> dict:
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist; this checkpoint cannot resume training") from None
    except Exception as err:  # torch raises various errors on corrupt zip files
        raise CheckpointError(f"{file} is corrupt ({err.__class__.__name__}: {err})") from None
