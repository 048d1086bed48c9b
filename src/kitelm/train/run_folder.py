"""A training run's folder, kept to one writer and one run.

* `RunLock`: an exclusive `flock` on `RUN/.lock` for the life of the trainer. A second writer is refused with the
  holder's pid; a lock left by a killed process is released by the kernel with the process, so the next run simply
  takes it over (the file's stale pid is overwritten).
* `claim_run_folder`: a folder that already holds a run (checkpoints, metrics or run.json) is refused unless the
  new run resumes it or `overwrite` replaces it, so two runs never mix their checkpoints and metrics.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from ..checkpoint import list_checkpoints
from ..errors import KitelmError

LOCK_FILE = ".lock"
RUN_FILES = ("metrics.jsonl", "run.json", "loss.png")  # with checkpoints/, what `kitelm train` writes into a run


class RunLock:
    """Holds `RUN/.lock` exclusively until `release()` (or the process ends)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise KitelmError(f"{folder} is in use by another kitelm training run ({holder}); wait for it to "
                              "finish or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def __del__(self) -> None:
        self.release()

    def release(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def holds_run(folder: Path) -> bool:
    return bool(list_checkpoints(folder)) or any((folder / name).exists() for name in RUN_FILES)


def claim_run_folder(folder: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse a folder that holds another run unless resuming it or overwriting it; `overwrite` deletes that run's
    checkpoints, metrics, run.json and plot (nothing else in the folder)."""
    if resuming or not holds_run(folder):
        return
    if not overwrite:
        steps = [int(p.name.split("-")[1]) for p in list_checkpoints(folder)]
        held = f"checkpoints up to step {max(steps)}" if steps else "the metrics of an earlier run"
        raise KitelmError(f"{folder} already holds a run ({held}); pass --resume auto to continue it, --overwrite "
                          "to replace it, or choose another --out")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
