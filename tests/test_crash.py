"""Crash-proof checkpoints: a training process killed with SIGKILL at random moments (also while it writes a
checkpoint) resumes with `--resume auto` and ends bitwise identical to an uninterrupted run; a process killed while
it loads a C++ extension does not make the next load wait for ever."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kitelm.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint

ARGS = ["--model", "transformer-tiny", "--steps", "40", "--batch-size", "4", "--seq-len", "32", "--eval-every", "20",
        "--eval-tokens", "256", "--save-every", "1", "--keep-last", "2", "--final-eval-tokens", "256", "--no-sample"]


def _command(corpus_dir, out):
    return [sys.executable, "-m", "kitelm", "--threads", "1", "train", "--data", str(corpus_dir), "--out", str(out),
            *ARGS, "--resume", "auto"]


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(corpus_dir, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    straight = tmp_path / "straight"
    subprocess.run(_command(corpus_dir, straight), check=True, env=env, capture_output=True)

    crashed = tmp_path / "crashed"
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(_command(corpus_dir, crashed), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ckpts = crashed / "checkpoints"
        seen = {p.name for p in list_checkpoints(crashed)}
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait for this process to write a checkpoint
            if ckpts.is_dir() and {p.name for p in list_checkpoints(crashed)} - seen:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))  # then kill it somewhere in the middle of steps and checkpoint writes
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for path in list_checkpoints(crashed):  # every checkpoint in place is complete
            verify_checkpoint(path)
    assert kills >= 2
    subprocess.run(_command(corpus_dir, crashed), check=True, env=env, capture_output=True)

    a = load_file(latest_checkpoint(straight) / "model.safetensors")
    b = load_file(latest_checkpoint(crashed) / "model.safetensors")
    assert latest_checkpoint(crashed).name == "step-00000040"
    # bitwise: the resumed and the uninterrupted run execute the same kernels in the same order on one machine
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (crashed / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_a_stale_torch_build_lock_does_not_hang_the_next_load():
    """A process killed while torch's extension loader held a build folder's `lock` file (every load takes it, even of
    a cached build) leaves the file behind. The next kitelm process must remove it and load, not wait for ever."""
    from torch.utils.cpp_extension import _get_build_directory

    from kitelm.ops import decode, extension

    if decode.EXTENSION.module() is None:
        pytest.skip("the C++ decode kernels do not build here")
    folder = Path(_get_build_directory(f"kitelm_decode_kernels_{extension.build_key(decode.EXTENSION.cflags)}", False))
    stale = folder / "lock"
    stale.touch()  # as a process killed inside torch's loader leaves it
    try:
        code = "import sys; from kitelm.ops.decode import EXTENSION; sys.exit(0 if EXTENSION.module() else 3)"
        done = subprocess.run([sys.executable, "-c", code], timeout=240, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)
