"""What the machine can hold: its available memory, with estimates checked against it before a large allocation (so
an impossible request is refused at once with the numbers instead of failing after gigabytes were allocated), and
output folders checked for being writable before any work is done."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import KitelmError

GiB = 1 << 30


def available_memory() -> int | None:
    """Bytes the kernel can hand out now without swapping (MemAvailable), or None where it is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(what: str, needed: int, fix: str) -> None:
    """Raise KitelmError when `needed` bytes exceed the available memory (never where that is unknown)."""
    available = available_memory()
    if available is not None and needed > available:
        raise KitelmError(f"{what} needs about {needed / GiB:.1f} GiB but only {available / GiB:.1f} GiB of memory "
                          f"is available; {fix}")


def training_bytes(params: int, vocab: int, width: int, mlp_width: int, n_layers: int, tokens: int,
                   low_precision: bool) -> int:
    """A lower estimate of a training step's peak memory: fp32 weights, gradients and AdamW's two moments
    (16 bytes a parameter; +2 for autocast's bf16 weight copies), the activations saved for the backward pass
    (~10 width-sized and 3 MLP-sized fp32 vectors per token and layer) and the logits with their gradient."""
    weights = params * (18 if low_precision else 16)
    activations = 4 * tokens * n_layers * (10 * width + 3 * mlp_width)
    logits = 2 * 4 * tokens * vocab
    return weights + activations + logits


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """Create folder `path` if needed and check that files can be written into it; a path that is a file, or a
    folder that cannot be written, raises KitelmError naming `flag`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KitelmError(f"{flag} {path} is a file, not a folder; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise KitelmError(f"{flag} {path} is not a writable folder ({err.strerror}); choose another {flag}") from None
    return path
