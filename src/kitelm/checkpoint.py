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

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], config, tokenizer,
                    train_state: dict | None = None, meta: dict | None = None, keep_last: int | None = None) -> Path:
    """Write checkpoint `step` (a full model state dict, its config and tokenizer, optionally the training state)
    atomically, and keep only the newest `keep_last` complete checkpoints."""
    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(state, tmp / MODEL_FILE, metadata={"format": "pt", "kitelm_arch": config.arch})
        config.save(tmp / CONFIG_FILE)
        tokenizer.save(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **(meta or {})}, indent=2) + "\n")
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): move the old copy aside first
            old = parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(parent)
    except OSError as err:
        if "tmp" in locals() and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
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
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"mis-shaped {shapes[:5]}" if shapes else ""]
        raise CheckpointError(f"{file} does not fit the model in config.json: " + "; ".join(p for p in parts if p))
    return state


def load_train_state(path: str | Path) -> dict:
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist; this checkpoint cannot resume training") from None
    except Exception as err:  # torch raises various errors on corrupt zip files
        raise CheckpointError(f"{file} is corrupt ({err.__class__.__name__}: {err})") from None
