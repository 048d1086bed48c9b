"""Weight-only quantized linear layers: storage formats, their pure-torch twins, and the fast paths (csrc/quant_kernels.cpp).

Formats (the stored form of a Linear weight W [out, in]; activations, biases and everything else stay high precision):

* ``bf16``: W rounded to bfloat16 (16 bits/weight).
* ``int8``: symmetric, q = round(W / s) ∈ [−127, 127] with one bf16 scale s = amax / 127 per `group` consecutive
  weights of a row (``group = in``: one scale per output channel). 8 + 16/group bits/weight.
* ``int4``: symmetric, q ∈ [−7, 7] with s = amax / 7 per group (a multiple of 32), stored as nibbles n = q + 8, two per
  byte: within each block of 32 weights, byte j holds weight j (low nibble) and weight j + 16 (high nibble).
  4 + 16/group bits/weight.

The scale is rounded to bf16 *before* q is computed, so ŵ = q·s is exactly what the kernels reconstruct and the only
error is the rounding of W/s: |W − ŵ| ≤ s/2 per weight (plus s·2⁻⁸·qmax where bf16 rounded s down and q clipped).

`quantized_linear` picks the path: for 1-8 rows of x (int8/int4, and bf16 without native bf16: 1-16, in calls of
≤ 8), the C++ GEMV (AVX-512 VNNI, AVX-512, AVX2 or portable C++, chosen at run time;
`KITELM_QUANT_ISA=portable|avx2|avx512|avx512vnni` forces one); above that, tiles of Ŵ dequantized into the compute dtype (bf16 where the CPU has native bf16, else fp32; csrc/dequant_kernels.cpp) and
that dtype's GEMM (bf16 weights on a bf16 machine: one GEMM on the stored matrix).

Activations on the GEMV path: bf16 weights multiply x in fp32. int8 and int4 weights multiply an int8 copy of x
(`quantize_activations`: per block of 32 values of a row, s_x = bf16(amax/127), x_q = round-half-even(x/s_x)), so
each block of 32 weights is one exact integer dot product D = Σ q·x_q scaled by s_w·s_x (llama.cpp's Q8_0
activations); that keeps one row of x at the memory rate (benchmarks/NOTES.md, "Quantized GEMV at the byte floor").
Layers whose width or group is no multiple of 32 keep fp32 x, and `KITELM_QUANT_X=fp32` keeps it everywhere;
`quantizes_x` says which applies. The tiled GEMM path (prefill, evaluation) always uses x as it is.

`linear_reference` is the twin every path is tested against: dequantize to fp32 + F.linear, or with `x_int8` the
exact block dots of the quantized x and Ŵ summed in fp32, which the kernels equal up to the fp32 summation order.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .extension import CppExtension, KernelPaths
from .prefill import add_bias_into

FORMATS = ("bf16", "int8", "int4")
QMAX = {"int8": 127, "int4": 7}
MAX_ROWS = 8  # rows of x per GEMV call (the kernels' register tiles)
# int8/int4 weights take the GEMV in calls of ≤ MAX_ROWS rows up to this many rows: dequantizing every weight into
# bf16 tiles for the GEMM costs more than a second pass over the packed weights (RG-2B batch 16: benchmarks/NOTES.md)
CHUNKED_GEMV_ROWS = 2 * MAX_ROWS
ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3}  # 3: int8-x dot products by VPDPBUSD
ISA_ALIASES = {"avx512bf16": "avx512vnni"}  # the former bf16-dot int4 path's name: every AVX512-BF16 CPU has VNNI
X_BLOCK = 32  # activations are quantized per block of 32 values of a row
X_FORMATS = ("int8", "fp32")
TILE_ELEMENTS = 1 << 24  # at most this many weights dequantized per tile on the GEMM path (32 MiB in bf16)
EXTENSION = CppExtension("quant_kernels", fallback="quantized layers use dequantize + F.linear",
                         cflags=("-O3", "-fopenmp"))  # baseline x86-64: the AVX2/AVX-512 paths carry target attributes
DEQUANT_EXTENSION = CppExtension("dequant_kernels", fallback="the GEMM path dequantizes tiles in pure torch",
                                 cflags=("-O3", "-fopenmp"))  # the tiles of the GEMM path (csrc/dequant_kernels.cpp)
DEQUANT_ISAS = {"portable": 0, "avx2": 1, "avx512": 2}


def check_format(fmt: str, in_features: int, group_size: int | None) -> int:
    """The group size to use for a [*, in_features] weight in `fmt` (0 for bf16); ConfigError for impossible ones."""
    if fmt not in FORMATS:
        raise ConfigError(f"weight format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if fmt == "bf16":
        return 0
    group = in_features if not group_size else group_size
    if group <= 0 or in_features % group:
        raise ConfigError(f"group size {group} does not divide the input width {in_features}; choose a divisor "
                          f"(e.g. {_divisor_hint(in_features, fmt)})")
    if fmt == "int4" and group % 32:
        raise ConfigError(f"int4 group size {group} is not a multiple of 32 (nibbles are packed in blocks of 32)")
    return group


def _divisor_hint(n: int, fmt: str) -> int:
    for g in (64, 128, 32, 256):
        if n % g == 0:
            return g
    return n if fmt == "int8" else 32


def bits_per_weight(fmt: str, group: int) -> float:
    return {"bf16": 16.0, "int8": 8.0 + 16.0 / max(group, 1), "int4": 4.0 + 16.0 / max(group, 1)}[fmt]


# -------------------------------------------------------------------------------------------- formats (twins)
QUANTIZE_CHUNK = 1 << 24  # weights quantized per pass: the float32 temporaries stay ~64 MiB each, whatever W's size


def quantize(weight: Tensor, fmt: str, group: int) -> tuple[Tensor, Tensor | None]:
    """W [out, in] (any float dtype) → (storage, scales [out, in/group] bf16, None for bf16). Rows are independent, so
    they are quantized QUANTIZE_CHUNK weights at a time: beside W and the result, memory holds only a few float32
    chunks (quantizing RecurrentGemma-9B's 4.2 GB embedding in one piece took ~3 float32 copies more)."""
    out, inp = weight.shape
    if fmt == "bf16":
        return weight.detach().to(torch.bfloat16), None
    qmax = QMAX[fmt]
    storage = torch.empty(out, inp // 2 if fmt == "int4" else inp, dtype=torch.uint8 if fmt == "int4" else torch.int8,
                          device=weight.device)
    scales = torch.empty(out, inp // group, dtype=torch.bfloat16, device=weight.device)
    step = max(1, QUANTIZE_CHUNK // max(inp, 1))
    for r in range(0, out, step):
        blocks = weight[r:r + step].detach().float().reshape(-1, inp // group, group)
        s = (blocks.abs().amax(-1) / qmax).to(torch.bfloat16)
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale, q = 0
        q = torch.round(blocks / s.float()[..., None]).clamp_(-qmax, qmax).to(torch.int8).reshape(-1, inp)
        storage[r:r + step] = pack_int4(q) if fmt == "int4" else q
        scales[r:r + step] = s
    return storage, scales


def pack_int4(q: Tensor) -> Tensor:
    """int8 [out, in] with values in [−8, 7], in % 32 == 0 → uint8 [out, in/2] (layout in the module docstring)."""
    out, inp = q.shape
    n = (q.to(torch.int16) + 8).to(torch.uint8).reshape(out, inp // 32, 2, 16)
    return (n[:, :, 0] | (n[:, :, 1] << 4)).reshape(out, inp // 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [out, in/2] → int8 [out, in] (q = nibble − 8)."""
    out, half = packed.shape
    b = packed.reshape(out, half // 16, 16)
    n = torch.stack((b & 0xF, b >> 4), dim=2)  # [out, blocks, 2, 16]
    return (n.to(torch.int16) - 8).to(torch.int8).reshape(out, 2 * half)


def dequantize_reference(storage: Tensor, scales: Tensor | None, fmt: str, group: int) -> Tensor:
    """Ŵ [out, in] float32 from the stored form (pure torch)."""
    if fmt == "bf16":
        return storage.float()
    q = unpack_int4(storage) if fmt == "int4" else storage
    out, inp = q.shape
    return (q.float().reshape(out, inp // group, group) * scales.float()[..., None]).reshape(out, inp)


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., in] (in a multiple of 32) → (x_q int8 [..., in], s_x float32 [..., in/32]), bit for bit as the GEMV
    kernels quantize it: per block of 32 consecutive values of a row, s_x = bf16(amax/127) (rounded to nearest even,
    like the weights' scales) and x_q = round-half-even(x/s_x) clamped to ±127. A block whose amax/127 is below the
    smallest normal float is all zero (s_x = 0); a block holding inf or NaN gets s_x = NaN and x_q = 0, so the outputs
    it feeds are NaN."""
    inp = x.shape[-1]
    if inp % X_BLOCK:
        raise ValueError(f"quantize_activations: the width {inp} is not a multiple of {X_BLOCK} (x is quantized per "
                         f"block of {X_BLOCK}); such layers keep fp32 activations")
    blocks = x.detach().float().reshape(*x.shape[:-1], inp // X_BLOCK, X_BLOCK)
    d = blocks.abs().amax(-1) / 127
    zero, bad = d < torch.finfo(torch.float32).tiny, ~torch.isfinite(d)  # NaN is neither < tiny nor finite
    s = torch.where(zero, 0.0, d.to(torch.bfloat16).float())
    s = torch.where(bad, float("nan"), s)
    usable = ~(zero | bad)
    q = torch.round(blocks / torch.where(usable, s, 1.0)[..., None]).clamp_(-127, 127)
    q = torch.where(usable[..., None], q, 0.0).to(torch.int8)
    return q.reshape(x.shape), s


def weight_integers(storage: Tensor, fmt: str) -> Tensor:
    """q [out, in] int8 of an int8 / int4 weight (ŵ = q·s)."""
    return unpack_int4(storage) if fmt == "int4" else storage


def linear_reference(x: Tensor, storage: Tensor, scales: Tensor | None, bias: Tensor | None, fmt: str,
                     group: int, x_int8: bool = False) -> Tensor:
    """The twin of every fast path → [..., out] float32. Default: F.linear(x, Ŵ, b) in float32. `x_int8` (int8/int4
    weights, width and group multiples of 32): x quantized by `quantize_activations`, the exact integer dot D of each
    block of 32 (float64, exact), then Σ_blocks (D·s_x)·s_w + b in float32, as the int8-x kernels compute it."""
    if not x_int8:
        return F.linear(x.float(), dequantize_reference(storage, scales, fmt, group),
                        None if bias is None else bias.float())
    if fmt == "bf16" or group % X_BLOCK:
        raise ValueError(f"x_int8 needs int8/int4 weights with a group that is a multiple of {X_BLOCK}")
    out, inp = storage.shape[0], x.shape[-1]
    nb = inp // X_BLOCK
    xq, sx = quantize_activations(x.reshape(-1, inp))
    q = weight_integers(storage, fmt)
    d = torch.bmm(xq.double().reshape(-1, nb, X_BLOCK).transpose(0, 1),  # [nb, rows, 32]
                  q.double().reshape(out, nb, X_BLOCK).permute(1, 2, 0)).float()  # [nb, rows, out]: |D| < 2²⁴
    sw = scales.float().repeat_interleave(group // X_BLOCK, dim=1)  # [out, nb]
    y = ((d * sx.T[:, :, None]) * sw.T[:, None, :]).sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], out)


def x_format() -> str:
    """How the GEMV path feeds int8/int4 weights: KITELM_QUANT_X=int8 (the default) or fp32."""
    value = os.environ.get("KITELM_QUANT_X", "") or "int8"
    if value not in X_FORMATS:
        raise ConfigError(f"KITELM_QUANT_X={value!r} is unknown; choose one of {', '.join(X_FORMATS)}")
    return value


def quantizes_x(fmt: str, in_features: int, group: int) -> bool:
    """Whether the C++ GEMV quantizes x to int8 for this layer, on every ISA alike: int8/int4 weights
    whose width and group are multiples of 32, unless KITELM_QUANT_X=fp32. Then `linear_reference(x_int8=True)` is
    its twin, else the plain one."""
    return (fmt in QMAX and in_features % X_BLOCK == 0 and group % X_BLOCK == 0 and group > 0
            and x_format() == "int8")


# ------------------------------------------------------------------------------------------------ fast paths
def quantized_linear(x: Tensor, storage: Tensor, scales: Tensor | None, bias: Tensor | None, fmt: str,
                     group: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """x [..., in] → x Ŵᵀ + b [..., out] in `out_dtype` (default: x's dtype)."""
    out_dtype = out_dtype or x.dtype
    rows = x.numel() // max(x.shape[-1], 1)
    kernels = _kernels() if x.device.type == "cpu" and not torch.is_grad_enabled() else None
    if kernels is None or not 1 <= rows <= gemv_rows(fmt):
        return _tiled_linear(x, storage, scales, bias, fmt, group, out_dtype)
    # the kernels take x [..., in] as it is (≤ MAX_ROWS rows) and return [..., out]; a decoding step makes ~170 of
    # these calls, so the common case adds as little Python as it can
    xf = x if x.dtype == torch.float32 else x.float()
    b = bias if bias is None or bias.dtype == torch.float32 else bias.float()
    isa = kernel_isa()
    if fmt == "bf16":
        gemv = lambda part: kernels.gemv_bf16(part, storage, b, isa)  # noqa: E731
    else:
        int8_x, gemv_int = x_format() == "int8", kernels.gemv_int8 if fmt == "int8" else kernels.gemv_int4
        gemv = lambda part: gemv_int(part, storage, scales, b, group, isa, int8_x)  # noqa: E731
    if rows <= MAX_ROWS:
        y = gemv(xf)
    else:
        flat = xf.reshape(rows, x.shape[-1])
        y = torch.cat([gemv(flat[r:r + MAX_ROWS]) for r in range(0, rows, MAX_ROWS)])
        y = y.reshape(*x.shape[:-1], storage.shape[0])
    return y if y.dtype == out_dtype else y.to(out_dtype)


def gemv_rows(fmt: str) -> int:
    """The most rows of x that `quantized_linear` multiplies by the GEMV (with the extension built) for `fmt`. bf16
    weights on a CPU with native bf16 take its GEMM above MAX_ROWS; elsewhere the tiled path would first convert
    every weight to fp32 tiles (RG-2B at batch 16 on the AVX2 Zen3: 4.8 tok/s, against 13 at batch 8), so they take
    the GEMV in calls of MAX_ROWS up to CHUNKED_GEMV_ROWS, as int8/int4 do."""
    if fmt != "bf16":
        return CHUNKED_GEMV_ROWS
    from ..precision import native_bf16

    return MAX_ROWS if native_bf16() else CHUNKED_GEMV_ROWS


def _tiled_linear(x: Tensor, storage: Tensor, scales: Tensor | None, bias: Tensor | None, fmt: str,
                  group: int, out_dtype: torch.dtype) -> Tensor:
    """Above 8 rows (or without the extension): x Ŵᵀ + b by the compute dtype's GEMM (bf16 where native, else fp32).
    bf16 storage already is a bf16 matrix: one F.linear on it, nothing copied. int8/int4 (and bf16 on an fp32
    machine): Ŵ dequantized at most TILE_ELEMENTS weights at a time (tiles of equal row counts) into one buffer that
    every tile of the call reuses (never the whole matrix). Each tile's product x·tileᵀ goes into its columns of y
    with the bias added in float32 (`add_bias_into`: cast and add in one pass); a single product that already is
    the answer (no bias, in `out_dtype`) is returned as it is."""
    compute = gemm_dtype(x)
    out, inp = storage.shape[0], x.shape[-1]
    x2 = x.reshape(-1, inp).to(compute)
    if fmt == "bf16" and compute == torch.bfloat16:
        y = F.linear(x2, storage)
        if bias is not None or y.dtype != out_dtype:
            y = _with_bias(y, bias, 0, torch.empty(x2.shape[0], out, dtype=out_dtype, device=x.device))
        return y.reshape(*x.shape[:-1], out)
    tiles = -(-out * inp // max(TILE_ELEMENTS, 1))
    step = -(-out // tiles)
    y = torch.empty(x2.shape[0], out, dtype=out_dtype, device=x.device)
    buffer = torch.empty(min(step, out), inp, dtype=compute, device=x.device) if fmt != "bf16" else None
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        if fmt == "bf16":
            tile = storage[r0:r1].to(compute)
        else:
            tile = buffer[:r1 - r0]
            _dequantize_into(storage[r0:r1], scales[r0:r1], fmt, group, tile)
        _with_bias(F.linear(x2, tile), bias, r0, y[:, r0:r1])
    return y.reshape(*x.shape[:-1], out)


def _with_bias(product: Tensor, bias: Tensor | None, first: int, out: Tensor) -> Tensor:
    """out = product + bias[first : first + columns] in float32 (bias None: the cast alone); returns out."""
    add_bias_into(product, None if bias is None else bias[first:first + product.shape[1]], out)
    return out


def bf16_gemm_path(x: Tensor, *layers) -> bool:
    """Whether `quantized_linear` multiplies x [..., in] (float32, no gradient recorded, CPU autocast off) by the
    weights of every one of `layers` (modules whose `.weight` is a QuantizedWeight) with the bf16 GEMM of the tiled
    path: more rows than `gemv_rows` on a device with native bf16. Layers that fuse their epilogues (`MLP`,
    `RecurrentBlock`) then pass bf16 products from one GEMM to the next instead of float32 tensors."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (rows > MAX_ROWS and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and all(isinstance(layer.weight, QuantizedWeight) and rows > gemv_rows(layer.weight.fmt)
                    for layer in layers)
            and gemm_dtype(x) == torch.bfloat16)


def _dequantize_into(storage: Tensor, scales: Tensor, fmt: str, group: int, tile: Tensor) -> None:
    """Rows of Ŵ (int8/int4 storage) into `tile` [rows, in] (float32 or bf16): the C++ kernel where it is built
    (bit for bit the twin), else `dequantize_reference`."""
    dq = _dequant_kernels() if storage.device.type == "cpu" else None
    if dq is not None:
        dq.dequantize_into(storage, scales, group, fmt == "int4", tile, dequant_isa())
    else:
        tile.copy_(dequantize_reference(storage, scales, fmt, group))


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the tiled GEMM: bf16 where the device multiplies bf16 natively, else float32 (x's own dtype when
    it is already bf16)."""
    from ..precision import native_bf16

    if x.dtype == torch.bfloat16 or native_bf16(x.device):
        return torch.bfloat16
    return torch.float32


def dequantize(storage: Tensor, scales: Tensor | None, fmt: str, group: int, in_features: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Ŵ [out, in] in `dtype` (the C++ kernel where built; equal to `dequantize_reference` for float32)."""
    if fmt == "bf16":
        return storage if dtype == torch.bfloat16 else storage.to(dtype)
    w = torch.empty(storage.shape[0], in_features, dtype=dtype, device=storage.device)
    _dequantize_into(storage, scales, fmt, group, w)
    return w


@functools.cache
def _kernels() -> ModuleType | None:
    return EXTENSION.module()


@functools.cache
def _dequant_kernels() -> ModuleType | None:
    return DEQUANT_EXTENSION.module()


# The GEMV path: KITELM_QUANT_ISA (portable | avx2 | avx512 | avx512vnni) if set, else the fastest this CPU runs; the
# tile dequantizer follows the same variable, its AVX-512 path serving both AVX-512 names.
PATHS = KernelPaths("KITELM_QUANT_ISA", ISAS, _kernels, ISA_ALIASES)
DEQUANT_PATHS = KernelPaths("KITELM_QUANT_ISA", DEQUANT_ISAS, _dequant_kernels,
                            {"avx512vnni": "avx512", "avx512bf16": "avx512"})
kernel_isa, dequant_isa, available_isas = PATHS.current, DEQUANT_PATHS.current, PATHS.available


class QuantizedWeight:
    """A stored weight Ŵ [out, in] seen as a matrix: what `QuantizedLinear.weight` / `QuantizedEmbedding.weight`
    return, so code that multiplies by `module.weight` (e.g. the tied output head) takes the quantized path through
    `kitelm.ops.decode.linear`."""

    def __init__(self, storage: Tensor, scales: Tensor | None, fmt: str, group: int, in_features: int):
        self.storage, self.scales, self.fmt, self.group = storage, scales, fmt, group
        self.shape = torch.Size((storage.shape[0], in_features))

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def linear(self, x: Tensor, bias: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
        """x Ŵᵀ + b in `out_dtype` (default x's dtype): e.g. a bf16 x with no bias gives the bare bf16 product."""
        return quantized_linear(x, self.storage, self.scales, bias, self.fmt, self.group, out_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.storage, self.scales, self.fmt, self.group, self.shape[1], dtype)
