"""kitelm's C++ extensions: compiled with `torch.utils.cpp_extension` on first use (about 45 s cold, then cached in
the torch extensions folder), never a hard requirement. Without a compiler, or with KITELM_NO_CPP=1, `module()`
returns None (with one warning for a failed build) and the caller uses its pure-PyTorch path.

Each build is named by `build_key()`: the torch install, the Python, the CPU's ISA flags and the compiler flags, so
two virtual environments (or two CPU types sharing one home directory) keep separate builds instead of rebuilding
each other's on every switch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

from ..errors import ConfigError

CSRC = Path(__file__).parent / "csrc"


class KernelPaths:
    """Which vector path of an extension's kernels runs. `levels` maps each path's name to the `isa` argument the
    kernels take (higher = faster); the fastest this CPU runs is the compiled module's `best_isa()`, and the
    environment variable `variable` set to a name of `levels` (or of its `aliases`) forces a slower one, as the tests
    do to check every path. The variable is read at each `current()` (one environment lookup); its resolution is
    cached."""

    def __init__(self, variable: str, levels: dict[str, int], kernels: Callable[[], ModuleType | None],
                 aliases: dict[str, str] | None = None):
        self.variable, self.levels, self.aliases, self._kernels = variable, levels, aliases or {}, kernels
        self._resolve = functools.cache(self._resolve_uncached)

    def current(self) -> int:
        """The level to pass as `isa`: the forced path if the variable is set, else the best this CPU runs."""
        return self._resolve(os.environ.get(self.variable, ""))

    def forced(self) -> bool:
        return bool(os.environ.get(self.variable))

    def best(self) -> int:
        """The fastest level this CPU runs (−1: the extension did not build)."""
        kernels = self._kernels()
        return kernels.best_isa() if kernels is not None else -1

    def available(self) -> list[str]:
        """The names of the paths this CPU runs (tests run every one)."""
        return [name for name, level in self.levels.items() if level <= self.best()]

    def _resolve_uncached(self, forced: str) -> int:
        best = max(self.best(), 0)
        if not forced:
            return best
        name = self.aliases.get(forced, forced)
        if name not in self.levels:
            raise ConfigError(f"{self.variable}={forced!r} is unknown; choose one of {', '.join(self.levels)}")
        if self.levels[name] > best:
            best_name = max((k for k, v in self.levels.items() if v <= best), key=self.levels.get, default="none")
            raise ConfigError(f"{self.variable}={forced}: this CPU does not run that path (best: {best_name})")
        return self.levels[name]


def disabled_reason() -> str:
    """Why no extension may be built ("" if they may)."""
    return "disabled by KITELM_NO_CPP" if os.environ.get("KITELM_NO_CPP", "") not in ("", "0") else ""


def summarize_build_error(error: Exception) -> str:
    """One line from a (long, multi-line) build error: the first compiler or shell error, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    errors = [line for line in lines[1:] if re.search(r"error|not found", line, re.IGNORECASE)]
    return f"{type(error).__name__}: {(errors or lines)[0][:300]}"


def build_key(cflags: list[str]) -> str:
    """A short hash of what a compiled extension depends on besides its source (which torch's loader hashes itself):
    the torch install and version, the Python executable, this CPU's flags (for -march=native), the flags, and the
    headers of csrc/ (torch's loader does not see what a source includes)."""
    import hashlib

    import torch

    from ..precision import cpu_flags

    parts = [torch.__version__, os.path.dirname(torch.__file__), sys.executable, " ".join(sorted(cpu_flags())),
             " ".join(cflags)] + [header.read_text() for header in sorted(CSRC.glob("*.h"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


class CppExtension:
    """One C++ source `csrc/<name>.cpp`, built into the module `kitelm_<name>` the first time it is asked for.
    `fallback` says (in the warning) what runs instead when it does not build; `cflags` default to this CPU's ISA
    (-march=native); a source that picks its ISA at run time (per-function target attributes) builds without it."""

    def __init__(self, name: str, fallback: str, cflags: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp")):
        self.name, self.fallback, self.cflags = name, fallback, list(cflags)
        self._loaded: tuple[ModuleType | None, str] | None = None

    def module(self) -> ModuleType | None:
        """The compiled module, or None if disabled or it does not build."""
        return None if disabled_reason() else self.load()[0]

    def unavailable_reason(self) -> str:
        return disabled_reason() or self.load()[1]

    def load(self) -> tuple[ModuleType | None, str]:
        """(module, "") after building or loading the cached build, or (None, why) with a single warning."""
        if self._loaded is None:
            try:
                self._loaded = self.build(), ""
            except Exception as error:  # no compiler, no ninja, compile error, unloadable .so: all mean "fall back"
                reason = summarize_build_error(error)
                warnings.warn(
                    f"kitelm: the C++ {self.name.replace('_', ' ')} did not build ({reason}); {self.fallback}. "
                    "Install a C++ compiler and ninja to enable it, or set KITELM_NO_CPP=1 to silence this warning.",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self._loaded = None, reason
        return self._loaded

    def build(self) -> ModuleType:
        """Compile (or load the cached build). A cached load takes well under a second; if this takes longer it is
        compiling, and one line on stderr says so rather than leaving the caller staring at a silent pause."""
        from torch.utils.cpp_extension import load

        notice = threading.Timer(2.0, lambda: print(
            f"kitelm: compiling the C++ {self.name.replace('_', ' ')} (first use only, about 45 s)...",
            file=sys.stderr, flush=True))
        notice.daemon = True
        notice.start()
        name = f"kitelm_{self.name}_{build_key(self.cflags)}"
        try:
            with exclusive_build_folder(name):
                return load(name=name, sources=[str(CSRC / f"{self.name}.cpp")], extra_cflags=self.cflags,
                            extra_ldflags=["-fopenmp"], verbose=False)
        finally:
            notice.cancel()


@contextlib.contextmanager
def exclusive_build_folder(name: str):
    """Hold an exclusive `flock` on the build folder of extension `name` while torch loads it. torch's loader guards
    the folder with a `lock` file, taken by every load (even of a cached build, for ninja's up-to-date check); a process
    killed while holding it leaves the file behind, and every later load of that extension then waits for ever. The
    kernel releases an flock when its holder dies, so a `lock` file found while kitelm holds the flock is stale: it is
    removed. (Where `fcntl` does not exist, torch's own lock is all there is.)"""
    try:
        import fcntl
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:
        yield
        return
    folder = Path(_get_build_directory(name, verbose=False))
    with open(folder / "kitelm.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        yield
