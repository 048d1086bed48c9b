"""Data-parallel training over 2 processes on CPU/gloo equals the single-process run with the same global batch,
for DDP and FSDP2, and a distributed run resumes on a different number of processes."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kitelm.presets import PRESETS, get_preset
from kitelm.errors import ConfigError
from kitelm.train.trainer import TrainConfig, Trainer
from numerics import fp32_tolerance, model_reductions

STEPS = 6


def trajectory_tolerance(name: str) -> float:
    """Relative bound on a loss (or a parameter's movement) after STEPS steps of two runs that differ only in how
    their sums are split across processes: each step's forward and backward round like any fp32 model
    (tests/numerics.py), over reductions of up to the 4 × 2 × 32 tokens of a step, and the steps' differences add."""
    terms, depth = model_reductions(get_preset(name), 4 * 2 * 32)
    return STEPS * fp32_tolerance(terms, 2 * depth)


def _config(corpus_dir, out, **kw):
    """float32 named explicitly: the spawned workers do not see conftest's fp32 default for `auto`."""
    return TrainConfig(out_dir=str(out), data=str(corpus_dir), steps=STEPS, batch_size=4, grad_accum=2, seq_len=32,
                       lr=3e-3, warmup_steps=2, eval_every=100, eval_tokens=256, save_every=100, log_every=1,
                       dtype="float32", **kw)


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _worker(rank, world, port, corpus_dir, root, models):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from kitelm.train import distributed

    for name in models:
        for mode in ("ddp", "fsdp"):
            Trainer(get_preset(name), _config(corpus_dir, root / f"{name}-{mode}"), distributed_mode=mode).train()
        # stopped after 3 steps: resumed below by a single process
        Trainer(get_preset(name), _config(corpus_dir, root / f"{name}-stopped"),
                distributed_mode="fsdp").train(until=3)
    distributed.cleanup(distributed.DistContext("ddp", rank, world))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    get_preset("transformer-tiny")  # loads the preset registry
    models = [m for m in ("transformer-tiny", "griffin-tiny") if m in PRESETS]
    root = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), corpus_dir, root, models), nprocs=2, join=True)
    return root, models


def test_ddp_and_fsdp_match_single_process(runs, corpus_dir, tmp_path):
    root, models = runs
    for name in models:
        single = Trainer(get_preset(name), _config(corpus_dir, tmp_path / name))
        single.train()
        reference = _losses(tmp_path / name)
        assert len(reference) == STEPS
        for mode in ("ddp", "fsdp"):
            got = _losses(root / f"{name}-{mode}")
            bound = trajectory_tolerance(name) * max(reference)
            assert max(abs(a - b) for a, b in zip(got, reference)) <= bound, (name, mode, got, reference)


def test_distributed_run_resumes_on_one_process(runs, corpus_dir, tmp_path):
    root, models = runs
    for name in models:
        resumed = Trainer(get_preset(name), _config(corpus_dir, root / f"{name}-stopped"), resume="auto")
        assert resumed.step == 3
        resumed.train()
        single = Trainer(get_preset(name), _config(corpus_dir, tmp_path / name))
        initial = [p.detach().clone() for p in single.model.parameters()]
        single.train()
        got, reference = _losses(root / f"{name}-stopped"), _losses(tmp_path / name)
        assert max(abs(a - b) for a, b in zip(got, reference)) <= trajectory_tolerance(name) * max(reference)
        # AdamW normalises each update, so a parameter whose gradient is rounding noise may move differently in the
        # two runs; the parameters as a whole differ by the trajectory's rounding, relative to how far they moved
        for a, b, start in zip(resumed.model.parameters(), single.model.parameters(), initial):
            assert (a - b).norm() <= trajectory_tolerance(name) * (b - start).norm()


def test_fsdp_without_process_group_is_a_clear_error(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="needs a process group; launch with `torchrun"):
        Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path), distributed_mode="fsdp")


def test_world_size_must_divide_the_global_batch(corpus_dir, tmp_path, monkeypatch):
    from kitelm.train import distributed

    monkeypatch.setattr(distributed, "setup", lambda mode: distributed.DistContext(mode, 0, 3))
    with pytest.raises(ConfigError, match="--batch-size 4 is the global batch and must be divisible by the 3"):
        Trainer(get_preset("transformer-tiny"), _config(corpus_dir, tmp_path), distributed_mode="ddp")
