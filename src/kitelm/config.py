"""Model configuration: one typed dataclass for every architecture, validation, JSON round trip.

A config is plain data: it builds a model through `kitelm.models.build_model(config)` and is saved as `config.json`
beside the weights. Fields that only one architecture uses say so in their comment; validation is per architecture.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .models import ARCHITECTURES

MLP_KINDS = ("geglu", "swiglu", "relu", "gelu")


BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def parse_field(key: str, annotation: str, raw: str) -> Any:
    """`raw` (a command-line string) as a value of the field's annotated type: `bool`, `int`, `float`, `str`, or any
    of those `| None` (`none` / `null`)."""
    kinds = {part.strip() for part in annotation.split("|")}
    text = raw.strip()
    if "None" in kinds and text.lower() in ("none", "null"):
        return None
    try:
        if "bool" in kinds:
            return BOOLEANS[text.lower()]
        if "int" in kinds:
            return int(text)
        if "float" in kinds:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except (KeyError, ValueError):
        expected = sorted(kinds - {"None"})[0] + (" or none" if "None" in kinds else "")
        example = {"bool": "true or false", "int": "an integer", "float": "a finite number"}.get(expected, expected)
        raise ConfigError(f"{key}={raw!r} is not a valid {expected}; give {example}") from None
    return raw


@dataclass
class ModelConfig:
    """Hyper-parameters of a language model. `arch` picks the model family (see `kitelm.models.ARCHITECTURES`)."""

    name: str = "custom"
    arch: str = "transformer"
    vocab_size: int = 257  # byte-level tokenizer: 256 bytes + <|endoftext|>
    width: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = multi-query; in between = grouped-query
    head_dim: int | None = None  # None = width // n_heads
    mlp: str = "geglu"  # geglu | swiglu (gated, two input matrices) or relu | gelu (plain)
    mlp_hidden: int | None = None  # None = 4·width for plain MLPs, 8/3·width rounded up to 64 for gated ones
    norm_eps: float = 1e-6
    rope_base: float = 10_000.0
    rope_fraction: float = 1.0  # fraction of each head's dimensions that RoPE rotates (Griffin: 0.5)
    tie_embeddings: bool = True
    init_std: float = 0.02
    max_seq_len: int = 1024  # longest context the model is trained for; the default KV-cache capacity
    logit_softcap: float = 0.0  # c·tanh(logits/c) when > 0 (RecurrentGemma: 30)
    # --- Griffin / Hawk / RecurrentGemma options (arch="griffin") ---------------------------------------------
    lru_width: int | None = None  # RG-LRU width L; None = width (RecurrentGemma), 5632 for the paper's 7B
    conv_width: int = 4  # temporal width of the recurrent block's depthwise causal Conv1D
    attention_window: int = 2048  # local attention: a query sees itself and the `attention_window` tokens before it
    block_pattern: str = "RRA"  # cycled over the layers: R = recurrent block, A = local attention (Hawk: "R")
    attention_kind: str = "mqa"  # the A blocks: mqa (Griffin's local MQA) | shaped (value-free shaped attention, SAS)
    embed_scale_sqrt: bool = False  # multiply input embeddings by bf16(sqrt(width)) (RecurrentGemma only)
    # --- Simplified-block options (He & Hofmann 2023) ------------------------------------------------------------
    # (arch="simplified"; models/simplified.py maps the paper's variants to these fields)
    pos_embedding: str = "rope"  # rope | learned (GPT-2's table of max_seq_len absolute positions, as the reference)
    parallel_block: bool = False  # attention and MLP read one shared Norm(x) and are summed (GPT-J, paper Eq. 7)
    attn_skip: bool = True  # α_SA·x skip around attention; a parallel block's one skip α_comb·x needs both skips
    mlp_skip: bool = True  # α_FF·x̂ skip around the MLP (sequential), or α_comb·x (parallel, with attn_skip)
    attn_matrix: str = "softmax"  # softmax | shaped (αI + βA − γC, Eq. 5) | skipinit (αI + βA, Eq. 4)
    value_proj: str = "linear"  # linear | orthogonal (trainable W^V, W^P) | identity (no W^V, W^P: SAS)
    first_layer_value: bool = True  # with value_proj=identity, layer 1 keeps W^V = α_V·I + β_V·ΔW (App. C)
    block_norms: bool = True  # False: only block 1's input norm and the final norm remain (Sec. 4.4, reference)
    final_norm: str = "rms"  # rms | layer (GPT-2's ln_f LayerNorm, kept by the reference even with RMSNorm blocks)
    qk_bias: bool = False  # biases on W^Q, W^K (GPT-2's fused c_attn has one; the reference keeps it)
    trainable_gains: bool = False  # block gains β_SA, α_FF, β_FF (and α_SA if kept) trainable, no weight decay
    mlp_gain_init: float = 1.0  # β_FF at init; skipless blocks need O(1/√depth) < 1: 0.1 at 18 layers (App. D.1)
    allow_unstable_blocks: bool = False  # permit combinations the paper reports as failing (see validate_config)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.n_heads

    @property
    def recurrent_width(self) -> int:
        """The RG-LRU width L (Griffin): `lru_width`, or `width` when it is None."""
        return self.lru_width or self.width

    @property
    def mlp_width(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp in ("geglu", "swiglu"):
            return 64 * -(-(8 * self.width // 3) // 64)
        return 4 * self.width

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid config {self.name!r}: {msg}")

        need(self.arch in ARCHITECTURES, f"arch={self.arch!r} is unknown; choose one of {sorted(ARCHITECTURES)}")
        for name in ("vocab_size", "width", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer")
        need(self.mlp in MLP_KINDS, f"mlp={self.mlp!r} is unknown; choose one of {list(MLP_KINDS)}")
        if self.head_dim is None:
            need(self.width % self.n_heads == 0,
                 f"n_heads={self.n_heads} does not divide width={self.width}; pick a divisor or set head_dim")
        need(self.dim_per_head % 2 == 0, f"head dimension {self.dim_per_head} must be even for RoPE")
        need(1 <= self.kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0,
             f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads} (1 = multi-query)")
        need(0.0 < self.rope_fraction <= 1.0, f"rope_fraction={self.rope_fraction} must be in (0, 1]")
        rotated = int(self.dim_per_head * self.rope_fraction)
        need(rotated % 2 == 0, f"rope_fraction={self.rope_fraction} rotates {rotated} dims; it must be even")
        need(self.mlp_width > 0, f"mlp_hidden={self.mlp_hidden} must be positive")
        need(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive")
        need(self.init_std > 0, f"init_std={self.init_std} must be positive")
        need(self.logit_softcap >= 0, f"logit_softcap={self.logit_softcap} must be >= 0 (0 disables it)")
        ARCHITECTURES[self.arch].validate_config(self, need)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: list[str]) -> "ModelConfig":
        """Apply `key=value` strings, each parsed by its field's type (`parse_field`), e.g. `["n_layers=4",
        "mlp=relu", "tie_embeddings=false"]`. The name records the overrides: `transformer-mini[n_layers=4]`."""
        changes: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. n_layers=4")
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                raise ConfigError(f"unknown config field {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
            changes[key] = parse_field(key, str(fields[key].type), raw)
        if "name" not in changes:
            changes["name"] = f"{self.name}[{','.join(overrides)}]"
        return self.replace(**changes)
