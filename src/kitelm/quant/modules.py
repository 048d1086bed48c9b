"""`QuantizedLinear` and `QuantizedEmbedding`: a model's Linear layers (and optionally its tied embedding/output
matrix) with their weight stored as bf16, int8 or int4 (`kitelm.ops.quant` has the formats and kernels).

What stays in high precision, always: norms, biases, the Conv1D, the RG-LRU (its gate matrices, `a_param`, the
recurrence and its state) and every non-Linear parameter. The recurrentgemma maintainers caution that "the
recurrence might require some care" (google-deepmind/recurrentgemma#6); the gates are 1.3 % of RG-2B's weights, so
keeping them costs little.

State-dict keys: `{module}.qweight` (the storage) and `{module}.scales` (int formats), `{module}.bias` as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.linear import Linear
from ..ops.quant import FORMATS, QuantizedWeight, bits_per_weight, check_format, dequantize_reference, quantize, \
    quantized_linear

# Chosen by measurement (benchmarks/NOTES.md, "Weight formats"): int8 per block of 32 costs +0.5 bit/weight over
# per-channel for a measurably lower error, int4 per 64 is llama.cpp's Q4_0-like size point at 4.25 bits/weight.
DEFAULT_GROUP = {"bf16": 0, "int8": 32, "int4": 64}


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's weights are stored: `weights` (bf16 | int8 | int4), `group_size` (weights per scale; 0 =
    one scale per output channel, int8 only), `embedding` (also store the tied embedding/output matrix so)."""

    weights: str
    group_size: int = -1  # -1 = the format's default
    embedding: bool = True

    def __post_init__(self):
        if self.weights not in FORMATS:
            raise ConfigError(f"weight format {self.weights!r} is unknown; choose one of {', '.join(FORMATS)}")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", DEFAULT_GROUP[self.weights])
        if self.weights == "int4" and self.group_size == 0:
            raise ConfigError("int4 needs a group size (a multiple of 32, e.g. --group-size 64)")

    def group_for(self, in_features: int) -> int:
        return check_format(self.weights, in_features, self.group_size or None)

    def bits(self, in_features: int) -> float:
        return bits_per_weight(self.weights, self.group_for(in_features))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        try:
            return cls(weights=data["weights"], group_size=int(data["group_size"]), embedding=bool(data["embedding"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"the quantization record in config.json is incomplete or malformed ({err})") from None


def _storage_shapes(fmt: str, out: int, inp: int, group: int) -> tuple[tuple, torch.dtype, tuple | None]:
    if fmt == "bf16":
        return (out, inp), torch.bfloat16, None
    return ((out, inp // 2) if fmt == "int4" else (out, inp)), (torch.uint8 if fmt == "int4" else torch.int8), \
        (out, inp // group)


class _Stored(nn.Module):
    """Shared by both modules: the storage buffers, and `_apply` that moves them across devices but never changes
    their dtype (`model.to(torch.float32)` must not turn bf16 storage or bf16 scales into something else)."""

    fmt: str
    group: int

    def _init_storage(self, out: int, inp: int, fmt: str, group: int, device) -> None:
        self.fmt, self.group = fmt, group
        shape, dtype, scale_shape = _storage_shapes(fmt, out, inp, group)
        self.register_buffer("qweight", torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("scales", None if scale_shape is None else
                             torch.empty(scale_shape, dtype=torch.bfloat16, device=device))

    def _apply(self, fn, recurse=True):
        dtypes = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def set_weight(self, weight: Tensor) -> None:
        storage, scales = quantize(weight, self.fmt, self.group)
        self.qweight = storage
        if scales is not None:
            self.scales = scales


class QuantizedLinear(_Stored):
    """x [..., in] → x Ŵᵀ + b [..., out] (in x's dtype); Ŵ from bf16 / int8 / int4 storage."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, group: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage(out_features, in_features, fmt, group, device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantizedLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, spec.weights,
                spec.group_for(linear.in_features), device=linear.weight.device)
        if linear.weight.device.type != "meta":
            q.set_weight(linear.weight)
            if linear.bias is not None:
                q.bias = nn.Parameter(linear.bias.detach().float().clone())
        return q

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.fmt, self.group, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self.qweight, self.scales, self.bias, self.fmt, self.group)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt}, group={self.group}, " \
               f"bias={self.bias is not None}"


class QuantizedEmbedding(_Stored):
    """ids [...] → rows of Ŵ [..., dim] in float32; `weight` (a QuantizedWeight) serves the tied output head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, group: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_storage(num_embeddings, embedding_dim, fmt, group, device)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> "QuantizedEmbedding":
        q = cls(embedding.num_embeddings, embedding.embedding_dim, spec.weights,
                spec.group_for(embedding.embedding_dim), device=embedding.weight.device)
        if embedding.weight.device.type != "meta":
            q.set_weight(embedding.weight)
        return q

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.fmt, self.group, self.embedding_dim)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat)
        scales = None if self.scales is None else self.scales.index_select(0, flat)
        w = dequantize_reference(rows, scales, self.fmt, self.group)
        return w.reshape(*ids.shape, self.embedding_dim)


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace, in place, every kitelm `Linear` by a `QuantizedLinear` (and the tied embedding by a
    `QuantizedEmbedding` when `spec.embedding`); weights are quantized now, or left empty on a meta model. Group
    sizes are checked for every layer before anything is replaced (ConfigError naming the layer)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    embed = getattr(model, "embed", None) if spec.embedding else None
    if embed is not None and not isinstance(embed, nn.Embedding):
        embed = None
    for name, m in targets + ([("embed", embed)] if embed is not None else []):
        width = m.in_features if isinstance(m, nn.Linear) else m.embedding_dim
        try:
            spec.group_for(width)
        except ConfigError as err:
            raise ConfigError(f"layer {name} (input width {width}): {err}") from None
    for name, m in targets:
        _set_submodule(model, name, QuantizedLinear.from_linear(m, spec))
    if embed is not None:
        model.embed = QuantizedEmbedding.from_embedding(embed, spec)
    return model


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantized_names(model: nn.Module, spec: QuantSpec) -> dict[str, tuple[int, int]]:
    """{'<module>.weight': (out, in)} of every full-precision weight that `quantize_model` would store in `spec`."""
    names = {f"{n}.weight": (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, Linear)}
    embed = getattr(model, "embed", None)
    if spec.embedding and isinstance(embed, nn.Embedding):
        names["embed.weight"] = (embed.num_embeddings, embed.embedding_dim)
    return names


__all__ = ["DEFAULT_GROUP", "QuantSpec", "QuantizedEmbedding", "QuantizedLinear", "quantize_model",
           "quantized_names"]
