"""The settings of every experiment, one hierarchy:

    Sizes                 batch and context of the model runs, shared by every experiment
    ├── BenchSettings     `kitelm bench`: which models each measurement runs, at which lengths
    └── StudyRecipe       `kitelm study`: a training recipe (steps, seeds, optimiser, evaluations, corpus)
        └── ReproduceScale  `kitelm reproduce`: a recipe plus the sizes of every experiment; it derives the recipe
                            and the bench settings of its experiments (`recipe()`, `bench()`)

Each class has the defaults of its command; `quick()` shrinks a command to a smoke run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..presets import get_preset
from ..errors import KitelmError
from ..train.trainer import TrainConfig

DEFAULT_STEPS = 300  # `kitelm reproduce`: training steps of every trained experiment at the reference budget
# The tasks experiment trains tiny models (steps bound by overhead, ~30 ms on 2 CPU cores), so it takes this many
# times the other experiments' steps at its own learning rate (benchmarks/NOTES.md, "Copy and induction tasks").
TASK_STEPS_PER_STEP = 15
TASK_LR = 3e-3
# The blocks study's (label, preset) pairs: the paper's variants (He & Hofmann 2023), then Griffin and Griffin-SAS, so
# the simplified attention is compared inside Griffin's (R, R, A) pattern under the same recipe.
BLOCK_VARIANTS = (
    ("Pre-LN", "preln-small"),
    ("Parallel", "parallel-small"),
    ("SAS", "sas-small"),
    ("SAS-P", "sas-p-small"),
    ("SAS-P, no norm", "sas-p-nonorm-small"),
    ("Griffin", "griffin-small"),
    ("Griffin-SAS", "griffin-sas-small"),
)


@dataclass
class Sizes:
    """Sequences per batch and tokens per sequence of an experiment's model runs, and their compute dtype ('auto':
    bf16 autocast where the CPU has native bf16, `kitelm.precision`)."""

    batch_size: int = 16
    seq_len: int = 128
    dtype: str = "auto"


@dataclass
class BenchSettings(Sizes):
    """Sizes of the `kitelm bench` measurements (batch_size × seq_len is the training-throughput batch)."""

    batch_size: int = 8
    seq_len: int = 512
    repeats: int = 5
    train_models: list[str] = field(default_factory=lambda: ["transformer-small", "sas-p-small", "hawk-small",
                                                             "griffin-small"])
    sample_models: list[str] = field(default_factory=lambda: ["griffin-small", "transformer-small"])
    prompt_len: int = 2048
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    peer_max_len: int = 4096
    memory_models: list[str] = field(default_factory=lambda: ["griffin-small", "hawk-small", "transformer-small"])
    memory_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    rss_max_len: int = 16384
    scan_shapes: list[tuple[int, int, int]] = field(default_factory=lambda: [(8, 4096, 1024), (8, 1024, 256)])
    peers: bool = True  # also measure the installed HF peers (train, sample, decode)
    # `serve`: concurrent streaming chat clients against `kitelm serve` (experiments/bench/serve.py)
    serve_models: list[str] = field(default_factory=lambda: ["griffin-small", "transformer-small"])
    serve_clients: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    serve_turns: int = 3
    serve_user_chars: int = 64
    serve_reply_tokens: int = 32
    serve_long_turns: int = 10  # the long conversation: TTFT of turn k with and without the kept state
    serve_long_user_chars: int = 300
    # decode per weight format (`kitelm bench decode --model recurrentgemma-2b --weights int8`, experiments/bench/decode.py)
    decode_models: list[str] = field(default_factory=lambda: ["griffin-small"])
    decode_weights: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8", "int4"])
    decode_group_size: int = -1  # -1: each format's default (quant/modules.py DEFAULT_GROUP)
    decode_embedding: bool = True  # quantize the tied embedding/output matrix too
    decode_prompt_lens: list[int] = field(default_factory=lambda: [64, 512, 2048])
    decode_batches: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    decode_steps: int = 12

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(batch_size=4, seq_len=256, repeats=2, prompt_len=256, lengths=[64, 256, 1024], peer_max_len=256,
                   memory_lengths=[1024, 4096], rss_max_len=4096, scan_shapes=[(4, 1024, 256)],
                   serve_clients=[1, 4], serve_turns=2, serve_long_turns=4,
                   train_models=["transformer-small", "griffin-small"], decode_prompt_lens=[64],
                   decode_batches=[1, 4], decode_steps=5)

    def check(self) -> None:
        """Refuse impossible sizes before any work starts."""
        for name in {*self.train_models, *self.sample_models, *self.memory_models}:
            get_preset(name)
        total = _total_memory_bytes()
        for name in self.memory_models:
            config = get_preset(name)
            if config.arch != "griffin":
                kv = 2 * config.n_layers * config.kv_heads * config.dim_per_head * 4 * max(self.memory_lengths)
                if total and kv > 0.8 * total:
                    raise KitelmError(f"a {max(self.memory_lengths):,}-token KV cache of {name} needs "
                                      f"{kv / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB; "
                                      "use shorter memory lengths")
        if any(n <= 0 for n in (self.batch_size, self.seq_len, self.repeats, self.prompt_len, *self.lengths)):
            raise KitelmError("benchmark sizes must be positive integers")
        self._check_decode_fits()

    def _check_decode_fits(self) -> None:
        """Each decode format must fit this machine's available memory (numbers in the error, before any work)."""
        from ..models import build_model
        from ..quant import QuantSpec
        from ..quant.checkpoint import conversion_bytes
        from ..resources import available_memory

        available = available_memory()
        for name in self.decode_models:
            config = get_preset(name)
            for weights in self.decode_weights:
                if weights == "fp32":
                    need = 4 * sum(t.numel() for t in build_model(config, device="meta").state_dict().values())
                else:
                    out, largest = conversion_bytes(config, QuantSpec(weights, self.decode_group_size,
                                                                      self.decode_embedding))
                    need = out + largest
                if available is not None and need > available:
                    raise KitelmError(f"decode bench: {name} in {weights} needs about {need / 2**30:.1f} GiB but "
                                      f"{available / 2**30:.1f} GiB of memory is available; drop {weights} from "
                                      "--weights (e.g. --weights int8 int4)")


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class StudyRecipe(Sizes):
    """Shared training recipe. Paper (App. D.1, reference `train.yaml`): AdamW (0.9, 0.999), weight decay 0.1,
    clip 1.0, 5% linear warmup then linear decay to ~0, peak LR 1e-3 (best for Pre-LN, SAS and SAS-P), T = 128."""

    steps: int = 1000
    seeds: int = 3
    seq_len: int = 128  # the paper's context length
    lr: float = 1e-3
    eval_points: int = 10  # validation evaluations per run
    eval_tokens: int = 32_768
    data: str | None = None  # text file, folder or glob; None = the Python standard library

    @classmethod
    def quick(cls) -> "StudyRecipe":
        """A smoke run of the whole pipeline (about 2 minutes on 2 CPU cores); its losses mean little."""
        return cls(steps=20, seeds=1, batch_size=8, seq_len=64, eval_points=2, eval_tokens=2048)

    def train_config(self, out_dir: Path, seed: int) -> TrainConfig:
        every = max(1, self.steps // self.eval_points)
        return TrainConfig(out_dir=str(out_dir), data=self.data, steps=self.steps, batch_size=self.batch_size,
                           seq_len=self.seq_len, lr=self.lr, min_lr_ratio=0.0, warmup_steps=max(1, self.steps // 20),
                           schedule="linear", weight_decay=0.1, beta1=0.9, beta2=0.999, grad_clip=1.0, eval_every=every,
                           eval_tokens=self.eval_tokens, save_every=self.steps, keep_last=1,
                           log_every=max(1, min(5, every)), seed=seed, dtype=self.dtype)


@dataclass
class ReproduceScale(StudyRecipe):
    """Sizes of every `kitelm reproduce` experiment. `reproduce.plan.plan(budget)` derives them from the budget;
    tests pass tiny ones directly. `steps` and `seeds` are the block study's (and `steps` the extrapolation runs')."""

    steps: int = DEFAULT_STEPS
    seeds: int = 2
    task_steps: int = TASK_STEPS_PER_STEP * DEFAULT_STEPS
    batch_size: int = 16
    seq_len: int = 128  # the simplified-blocks paper's context; extrapolation is evaluated up to 4× this
    block_variants: tuple = BLOCK_VARIANTS  # the whole `kitelm study blocks`: paper variants, Griffin, Griffin-SAS
    throughput_models: tuple = ("transformer-small", "griffin-small")  # SAS/SAS-P speed: from the block study
    repeats: int = 3
    lm_models: tuple = (("Griffin", "griffin-small"), ("Transformer", "transformer-small"))
    eval_windows: int = 16
    # (label, preset, overrides): Griffin's local-attention window covers a whole sample, as the Transformer's
    # attention does; with griffin-tiny's 16-token window the keys lie beyond it and Griffin learns induction as
    # slowly as Hawk. The Transformer is multi-head (a key/value head per query head, n_kv_heads = n_heads = 4):
    # with transformer-tiny's grouped-query attention (2 K/V heads for 4 query heads) it left the induction plateau
    # only at step 3,500-4,500 of 5,000 in one run and not within 6,075 in another; with MHA by step 2,700 of 6,000
    # in five seeds, but in one of two seeds of 4,215 (benchmarks/NOTES.md, "Copy and induction tasks")
    task_models: tuple = (("Griffin", "griffin-tiny", ("attention_window=128",)), ("Hawk", "hawk-tiny", ()),
                          ("Transformer", "transformer-tiny", ("n_kv_heads=4",)))
    task_lr: float = TASK_LR
    tasks: tuple = ("selective-copy", "induction")
    sample_models: tuple = ("griffin-small", "transformer-small")
    prompt_len: int = 256
    sample_lengths: tuple = (128, 512, 2048)
    memory_models: tuple = ("griffin-small", "hawk-small", "transformer-small")
    memory_lengths: tuple = (512, 2048, 8192, 32768)
    rss_max_len: int = 2048
    paper_sizes: tuple = ("preln-paper", "sas-paper", "sas-p-paper")

    def recipe(self, **changes) -> StudyRecipe:
        """This scale's training recipe (its StudyRecipe fields), with `changes`."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(StudyRecipe)}
        return StudyRecipe(**(base | changes))

    def task_configs(self) -> list[tuple[str, ModelConfig]]:
        """(label, model config) of each model of the tasks experiment."""
        return [(label, get_preset(p).with_overrides(list(o)) if o else get_preset(p))
                for label, p, o in self.task_models]

    def bench(self, **changes) -> BenchSettings:
        """Bench settings at this scale's batch, context and repeats, with `changes` (the models and lengths)."""
        return BenchSettings(batch_size=self.batch_size, seq_len=self.seq_len, repeats=self.repeats, **changes)
