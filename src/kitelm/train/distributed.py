"""Data-parallel training on torch.distributed: DDP, or FSDP2 (`fully_shard` on each block, then the root).

Launch with torchrun (`torchrun --nproc_per_node=N -m kitelm train --distributed ddp|fsdp ...`); the process group
comes from torchrun's environment; gloo on CPU, NCCL on GPU. Models never import this module: wrapping happens here.
Checkpoints always hold full (unsharded) state dicts, so a run resumes on any number of processes.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import ConfigError

MODES = ("ddp", "fsdp")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistContext:
    mode: str | None = None  # None = one process
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(mode: str | None) -> DistContext:
    """Join the process group that torchrun described in the environment (or return the one-process context)."""
    if mode is None:
        return DistContext()
    if mode not in MODES:
        raise ConfigError(f"--distributed {mode!r} is unknown; choose one of {list(MODES)}")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(f"--distributed {mode} needs a process group; launch with "
                              f"`torchrun --nproc_per_node=N -m kitelm train --distributed {mode} ...`")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return DistContext(mode, dist.get_rank(), dist.get_world_size(), device)


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP: a wrapper around `model`. FSDP2: shards `model` in place (each block, then the root) and returns it."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def no_grad_sync(wrapped: torch.nn.Module, ctx: DistContext):
    """Skip the gradient all-reduce on accumulation micro-batches that are not the last (DDP)."""
    return wrapped.no_sync() if ctx.mode == "ddp" else nullcontext()


def mean_across_ranks(value: float, ctx: DistContext) -> float:
    if ctx.mode is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.world


def barrier(ctx: DistContext) -> None:
    if ctx.mode is not None:
        dist.barrier()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on CPU, keyed by parameter names (a collective under FSDP)."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optim_state: dict | None = None) -> None:
    """Load full state dicts into a plain, DDP-wrapped or FSDP-sharded model (and its optimizer)."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def cleanup(ctx: DistContext) -> None:
    if ctx.mode is not None and dist.is_initialized():
        dist.destroy_process_group()
