"""Prefill kernels (csrc/prefill_kernels.cpp) against their pure-torch twins on random inputs (the epilogues of the
bf16 GEMM path and the layers' fused paths: the second half of this file, whose bounds are in its comment).

`rglru_scan` (the RG-LRU's gates fused into its scan) vs `RGLRU._gated` + `linear_scan`. The two compute the same
float32 operations in the same order except for exp (the kernel's polynomial vs torch's), so the tolerance is derived
per element from the float64 values: with ε_exp = 4u (either exp within 2 ulp; u = 2⁻²⁴) and ε_σ = ε_exp + 2u
(1 + e⁻ᵍ and the division), log a = −c·softplus·σ has relative error ε_log = ε_σ + 2u, so
  ε_a  = ε_exp + |log a|·ε_log,   ε_a² = ε_exp + 2|log a|·ε_log,
  1 − a² has relative error a²·ε_a²/(1 − a²) + u (the cancellation near a → 1 is the function's own conditioning),
  ε_m = ½·that + u,   ε_x̂ = ε_σ + ε_m + 2u,
  δh_t ≤ a·δh_{t−1} + a·|h_{t−1}|·(ε_a + u) + |x̂_t|·(ε_x̂ + u) + u·|h_t|,
each implementation within δh of the exact value, so the two within 2·δh.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kitelm import precision
from kitelm.layers.mlp import MLP
from kitelm.layers.recurrent import RecurrentBlock
from kitelm.layers.rglru import C, RGLRU
from kitelm.ops import prefill
from kitelm.ops.quant import bf16_gemm_path, dequantize_reference
from kitelm.ops.scan import linear_scan
from kitelm.quant import QuantSpec, quantize_model

U = 2.0**-24
B16 = 2.0**-8  # one bf16 ulp, relative
K2 = 2 * math.sqrt(2 / math.pi)
NATIVE_BF16 = precision.native_bf16  # the real one (conftest makes `auto` mean float32 in every other test)
KERNELS = prefill._kernels()
ISAS = prefill.available_isas()


@pytest.fixture
def kernels():
    if KERNELS is None:
        pytest.skip("the C++ prefill kernels did not build")
    return KERNELS


def scan_bound(layer: RGLRU, x: torch.Tensor, segment_pos: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """2·δh per element (the module docstring), from float64 values of the gates and the scan."""
    xd = x.double()
    gx = torch.sigmoid(layer.input_gate(x).double())
    ga = torch.sigmoid(layer.a_gate(x).double())
    log_a = -C * ga * torch.nn.functional.softplus(layer.a_param.double())
    a, a2 = torch.exp(log_a), torch.exp(2 * log_a)
    reset = (segment_pos == 0)[..., None]
    e_exp = 4 * U
    e_sig = e_exp + 2 * U
    e_log = e_sig + 2 * U
    e_a = e_exp + log_a.abs() * e_log
    e_a2 = e_exp + 2 * log_a.abs() * e_log
    e_m = 0.5 * (a2 * e_a2 / (1 - a2) + U) + U
    m = torch.where(reset, 1.0, torch.sqrt(1 - a2))
    e_m = torch.where(reset, 0.0, e_m)
    a = torch.where(reset, 0.0, a)
    xn = xd * gx * m
    e_xn = e_sig + e_m + 2 * U
    h = h0.double()
    dh = torch.zeros_like(h)
    out = []
    for t in range(x.shape[1]):
        h_new = a[:, t] * h + xn[:, t]
        dh = a[:, t] * dh + a[:, t] * h.abs() * (e_a[:, t] + U) + xn[:, t].abs() * (e_xn[:, t] + U) + U * h_new.abs()
        h = h_new
        out.append(dh)
    return 2 * torch.stack(out, 1) + 1e-30


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width,heads", [(64, 2), (48, 2), (80, 1)])  # blocks of 32, 24 (a tail of 8), 80
@pytest.mark.parametrize("with_h0", [False, True])
def test_rglru_scan_matches_its_twin(kernels, isa, width, heads, with_h0, monkeypatch):
    monkeypatch.setenv("KITELM_PREFILL_ISA", isa)
    torch.manual_seed(0)
    layer = RGLRU(width, heads).eval()
    b, t = 2, 67
    x = torch.randn(b, t, width)
    segment_pos = torch.stack([torch.arange(t), torch.arange(t) - 20]).clamp(min=-1)  # row 1: pads, a start at 20
    segment_pos[0, 40:] = torch.arange(t - 40)  # row 0: a second document from 40
    h0 = torch.randn(b, width) if with_h0 else torch.zeros(b, width)
    with torch.inference_mode():
        got, got_last = layer(x, segment_pos, h0 if with_h0 else None)
        a, xn = layer._gated(x, segment_pos)
        want, want_last = linear_scan(a, xn, h0)
    assert got.shape == want.shape and got.dtype == torch.float32 and got_last.shape == want_last.shape
    bound = scan_bound(layer, x, segment_pos, h0)
    err = (got.double() - want.double()).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
    assert torch.equal(got_last, got[:, -1])


def test_rglru_scan_is_used_only_for_fp32_prefill_without_autograd(kernels, monkeypatch):
    calls = []
    original = prefill.prefill_kernels

    def spy(x):
        k = original(x)
        calls.append(k is not None)
        return k

    monkeypatch.setattr("kitelm.layers.rglru.prefill_kernels", spy)
    layer = RGLRU(32, 1)
    x, pos = torch.randn(1, 5, 32), torch.arange(5)[None]
    layer(x, pos)  # autograd on
    with torch.inference_mode():
        layer(x, pos)
        layer(x[:, :1], pos[:, :1])  # one token: decoding takes `step`; as input here the twin runs
        assert prefill.prefill_kernels(x.double()) is None and prefill.prefill_kernels(x.bfloat16()) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the gate matmuls would be bf16
            assert prefill.prefill_kernels(x) is None
    assert calls == [False, prefill._kernels().best_isa() >= prefill.ISAS["avx2"], False]


def test_forced_isa_is_checked(monkeypatch):
    monkeypatch.setenv("KITELM_PREFILL_ISA", "avx3")
    with pytest.raises(Exception, match="KITELM_PREFILL_ISA"):
        prefill.prefill_isa()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("t", [1, 2, 37])  # chunks shorter than the state too
def test_conv1d_forward_is_bit_exact_to_its_twin(kernels, with_state, t, monkeypatch):
    """The same float32 operations in the same order as the torch forward: equal bits, incl. document starts inside
    the chunk, pads (−1) and an inf input (inf·0 = NaN where a start cuts the tap, as in torch)."""
    from kitelm.layers.conv1d import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(300, 4)
    torch.nn.init.normal_(conv.b)
    x = torch.randn(3, t, 300)
    pos = torch.stack([torch.arange(t), torch.arange(t) - 5, torch.arange(t) + 9]).clamp(min=-1)
    if t > 20:
        pos[2, 20:] = torch.arange(t - 20)
        x[2, 18, 7] = float("inf")
    state = torch.randn(3, 3, 300) if with_state else None
    with torch.inference_mode():
        got, got_state = kernels.conv1d_forward(x, conv.w, conv.b, state if with_state else torch.zeros(3, 3, 300),
                                                pos)
        monkeypatch.setattr("kitelm.layers.conv1d.prefill_kernels", lambda x: None)
        want, want_state = conv(x, pos, state)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got_state.isnan(), want_state.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got_state.nan_to_num(),
                                                                             want_state.nan_to_num())


# ------------------------------------------------------------------------ epilogues of the bf16 GEMM path
# `gelu_mul` and `add_bias_into` against float64 and their pure-torch twins, on every ISA path this CPU runs, and the fused GeGLU / recurrent-block paths of the layers
# against their plain torch forms.
#
# Bounds (u = 2⁻²⁴, float32; b16 = 2⁻⁸, one bf16 ulp relative):
# * `gelu_mul` computes v = fl(a + b_a), t = 2k(v + 0.044715 v³) (three roundings, ≤ 4u relative), E = exp(−t) (the
#   kernel's exp within 2 ulp of the exact value of its rounded argument: relative 4u + 4u·|t|), σ = 1/(1 + E)
#   (≤ ε_E + 2u), gelu = v·σ (+u) and the product with w = fl(b + b_b) (+2u). With gelu' ≤ 1.13 the rounding of v adds
#   1.13·|v|·u·|w|. So |y − y₆₄| ≤ |y₆₄|·(4u|t| + 14u) + 1.13·|v|·|w|·u, and a bf16 output adds its own rounding,
#   ≤ ½·b16·|y| (plus the float32 error, which may carry a value across a rounding boundary: b16·|y₆₄| covers both).
# * `add_bias_into` is one float32 addition (and one bf16 rounding): bit for bit its twin.
# * The fused layers compute the same float32 maths as their plain forms except the GeLU (the kernel's vs torch's) and
#   hand the same bf16-rounded product to the next GEMM; the two roundings may differ by one bf16 ulp where the float32
#   values straddle a boundary, so the next product differs by at most b16 · (|h| |Ŵ|ᵀ), which is the bound used.


def gelu_mul_64(a, b, a_bias, b_bias):
    v = a.double() + (0 if a_bias is None else a_bias.double())
    w = b.double() + (0 if b_bias is None else b_bias.double())
    return F.gelu(v, approximate="tanh") * w, v, w


def gelu_mul_bound(a, b, a_bias, b_bias, bf16_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 value, elementwise bound) per the comment above."""
    y, v, w = gelu_mul_64(a, b, a_bias, b_bias)
    t = K2 * (v + 0.044715 * v**3)
    bound = y.abs() * (4 * U * t.abs() + 14 * U) + 1.13 * v.abs() * w.abs() * U
    if bf16_out:
        bound = bound + B16 * y.abs()
    return y, bound


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("a_dtype, b_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols, biases", [(1, 2560, False), (5, 37, True), (70, 160, True)])
def test_gelu_mul_is_within_its_bound_of_float64(kernels, isa, a_dtype, b_dtype, out_dtype, rows, cols, biases,
                                                 monkeypatch):
    monkeypatch.setenv("KITELM_PREFILL_ISA", isa)
    torch.manual_seed(rows * cols)
    a, b = (torch.randn(rows, cols) * 4).to(a_dtype), torch.randn(rows, cols).to(b_dtype)
    a_bias, b_bias = (torch.randn(cols), torch.randn(cols)) if biases else (None, None)
    with torch.inference_mode():
        y = prefill.gelu_mul(a, b, a_bias, b_bias, out_dtype)
        twin = prefill.gelu_mul_reference(a, b, a_bias, b_bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == a.shape
    exact, bound = gelu_mul_bound(a, b, a_bias, b_bias, out_dtype == torch.bfloat16)
    assert ((y.double() - exact).abs() <= bound).all()
    # the twin too, whose ½v(1 + tanh) loses digits deep in the negative tail: tanh within 4 ulp of −1 adds ½|v|·|w|·8u
    _, v, w = gelu_mul_64(a, b, a_bias, b_bias)
    assert ((twin.double() - exact).abs() <= bound + 4 * U * v.abs() * w.abs()).all()


def test_gelu_mul_takes_strided_and_broadcast_operands(kernels):
    a, b = torch.randn(6, 40), torch.randn(6, 40)
    with torch.inference_mode():
        strided = prefill.gelu_mul(a[:, ::2], b[:, ::2])  # column stride 2: copied for the kernel
        broadcast = prefill.gelu_mul(a, b[0])  # b [C] against a [N, C]: the twin broadcasts
    exact, bound = gelu_mul_bound(a[:, ::2], b[:, ::2], None, None, False)
    assert ((strided.double() - exact).abs() <= bound).all()
    assert torch.equal(broadcast, prefill.gelu_mul_reference(a, b[0]))


@pytest.mark.parametrize("isa", ISAS)
def test_gelu_mul_keeps_special_values(kernels, isa, monkeypatch):
    monkeypatch.setenv("KITELM_PREFILL_ISA", isa)
    v = torch.tensor([float("inf"), float("nan"), 80.0, -80.0, -12.0, 0.0, -0.0, 1e-30] + [0.5] * 8)
    w = torch.ones_like(v)
    with torch.inference_mode():
        y = prefill.gelu_mul(v[None], w[None])[0]
    assert y[0] == float("inf") and y[1].isnan()
    assert y[2] == 80.0 and y[3] == 0.0 and y[4] == 0.0 and y[5] == 0.0
    assert y[7].item() == pytest.approx(0.5e-30, rel=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_bias_into_is_bit_exact(kernels, isa, out_dtype, monkeypatch):
    monkeypatch.setenv("KITELM_PREFILL_ISA", isa)
    src = torch.randn(9, 50).to(torch.bfloat16)
    src[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    bias = torch.randn(50)
    wide = torch.zeros(9, 70, dtype=out_dtype)
    with torch.inference_mode():
        prefill.add_bias_into(src, bias, wide[:, 10:60])  # a column slice, as the tiles of a product write it
        plain = torch.empty(9, 50, dtype=out_dtype)
        prefill.add_bias_into(src, None, plain)
    expected = prefill.add_bias_reference(src, bias).to(out_dtype)
    assert torch.equal(wide[:, 10:60].isnan(), expected.isnan())
    assert torch.equal(wide[:, 10:60].nan_to_num(), expected.nan_to_num())
    assert (wide[:, :10] == 0).all() and (wide[:, 60:] == 0).all()
    assert torch.equal(plain.nan_to_num(), src.to(out_dtype).nan_to_num())
    assert plain[0, 3].item() == 0.0 and torch.signbit(plain[0, 3])  # no bias: −0 stays −0


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_outputs_round_as_torch_and_keep_every_nan(kernels, isa, monkeypatch):
    """The vector paths' bf16 rounding against torch's, on NaNs whose payload sits in the low 16 bits only (rounded
    as plain bits they would carry into inf), ties and values next to them, in vectors and in the scalar tail."""
    monkeypatch.setenv("KITELM_PREFILL_ISA", isa)
    bits = torch.tensor([0x7F800001, 0xFF800001, 0x7F80FFFF, 0x7FFFFFFF, 0x3F808000, 0x3F818000, 0x3F808001,
                         0x7F7FFFFF, 0x00000001, 0x80008000], dtype=torch.int64)
    src = torch.cat([bits, bits.flip(0)] * 2).to(torch.int32).view(torch.float32)[None]  # 40 columns
    src = torch.cat([src, torch.randn(3, 40)])
    out = torch.empty(4, 40, dtype=torch.bfloat16)
    with torch.inference_mode():
        prefill.add_bias_into(src, None, out)  # no bias: the values reach the rounding as they are
    expected = src.to(torch.bfloat16)
    assert torch.equal(out.isnan(), src.isnan())
    assert torch.equal(out.nan_to_num().view(torch.int16), expected.nan_to_num().view(torch.int16))


def test_epilogues_check_their_arguments(kernels):
    a = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="one shape"):
        kernels.gelu_mul(a, None, torch.randn(4, 8), None, False, 0)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        kernels.add_bias_into(a, torch.randn(3), torch.empty(4, 16), 0)
    with pytest.raises(RuntimeError, match="float32/bfloat16"):
        kernels.gelu_mul(a.double(), None, a.double(), None, False, 0)


# `soft_cap` (x ← cap·tanh(x / cap) in place) against float64: the division and the product round once each (≤ u
# relative apiece), the kernel's tanh is within 3 ulp (Cephes' polynomial below 0.625, 1 − 2/(e^{2|y|} + 1) with
# exp_v above) and std::tanh within 1: ≤ 5 ulp in all, and an ulp is at most 2u relative, so 10u·|exact|.
SOFT_CAP_BOUND = 10 * U


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [256_000, 37])  # RecurrentGemma's vocabulary (vectors over two threads), a short tail
def test_soft_cap_is_within_its_bound_of_float64_in_place(kernels, isa, n, monkeypatch):
    monkeypatch.setenv("KITELM_PREFILL_ISA", isa)
    torch.manual_seed(0)
    logits = torch.randn(1, 1, n) * torch.logspace(-6, 3, n)  # the polynomial, the exp branch and saturation
    exact = 30.0 * torch.tanh(logits.double() / 30.0)
    with torch.inference_mode():
        out = prefill.soft_cap(logits, 30.0)
    assert out.data_ptr() == logits.data_ptr()
    assert ((out.double() - exact).abs() <= SOFT_CAP_BOUND * exact.abs()).all()
    assert torch.equal(torch.signbit(out), torch.signbit(exact))


@pytest.mark.parametrize("isa", ISAS)
def test_soft_cap_keeps_special_values(kernels, isa, monkeypatch):
    monkeypatch.setenv("KITELM_PREFILL_ISA", isa)
    v = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e4, 3e38] * 3)  # vectors + tail
    with torch.inference_mode():
        y = prefill.soft_cap(v.clone(), 30.0)
    assert y[0::8].isnan().all() and (y[1::8] == 30.0).all() and (y[2::8] == -30.0).all()
    assert (y[3::8] == 0).all() and torch.signbit(y[4::8]).all() and (y[6::8] == -30.0).all() and (y[7::8] == 30.0).all()
    assert ((y[5::8] - 1e-30).abs() <= 2e-37).all()


def test_soft_cap_falls_back_to_its_twin_where_the_kernel_does_not_apply(kernels):
    x = torch.randn(4, 6) * 50
    strided, half = x.t(), x.to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(prefill.soft_cap(strided, 30.0), prefill.soft_cap_reference(strided, 30.0))
        assert torch.equal(prefill.soft_cap(half, 30.0), prefill.soft_cap_reference(half, 30.0))
    leaf = x.clone().requires_grad_()
    prefill.soft_cap(leaf, 30.0).sum().backward()  # autograd: the twin, a new tensor
    assert torch.allclose(leaf.grad, 1 - torch.tanh(x / 30.0) ** 2)
    with pytest.raises(RuntimeError, match="cap must be > 0"):
        kernels.soft_cap_(x.clone(), 0.0, 0)


@pytest.fixture
def bf16_machine(monkeypatch):
    """The real `native_bf16` (the tiled path's GEMM dtype), or a skip where the fused paths cannot run."""
    if KERNELS is None or not NATIVE_BF16():
        pytest.skip("the fused bf16 paths need the prefill kernels and a CPU with native bf16")
    monkeypatch.setattr(precision, "native_bf16", NATIVE_BF16)


def _product_bound(h: torch.Tensor, layer) -> torch.Tensor:
    """b16 · (|h| |Ŵ|ᵀ) of the layer's stored weight: one bf16 ulp of every input of its product (the comment above)."""
    w = layer.weight
    w_hat = dequantize_reference(w.storage, w.scales, w.fmt, w.group).double()
    return B16 * (h.double().abs() @ w_hat.abs().t())


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_fused_geglu_matches_the_plain_mlp(bf16_machine, fmt):
    torch.manual_seed(0)
    mlp = quantize_model(MLP(64, 96, "geglu", bias=True), QuantSpec(fmt, 32 if fmt != "bf16" else -1))
    for lin in (mlp.gate, mlp.up, mlp.down):
        torch.nn.init.normal_(lin.bias)
    x = torch.randn(2, 12, 64)
    with torch.inference_mode():
        assert bf16_gemm_path(x, mlp.gate, mlp.up, mlp.down)
        fused, plain = mlp(x), mlp.forward_ref(x)
        h = F.gelu(mlp.gate(x), approximate="tanh") * mlp.up(x)  # the plain path's input of `down`
    assert fused.dtype == torch.float32
    assert ((fused.double() - plain.double()).abs() <= _product_bound(h, mlp.down) + 4 * U * plain.abs()).all()


def test_fused_recurrent_block_matches_the_plain_path(bf16_machine, monkeypatch):
    torch.manual_seed(1)
    block = quantize_model(RecurrentBlock(64, 64, 4, 4, 1.0), QuantSpec("int8", 32))
    for lin in (block.linear_x, block.linear_y, block.linear_out):
        torch.nn.init.normal_(lin.bias, std=0.5)
    x = torch.randn(2, 12, 64)
    pos = torch.arange(12).repeat(2, 1)
    captured = {}
    original = block._output

    def spy(y, u, fused):
        captured["u"], captured["fused"] = u, fused
        return original(y, u, fused)

    monkeypatch.setattr(block, "_output", spy)
    with torch.inference_mode():
        fused = block(x, pos, None)
        assert captured["fused"]
        monkeypatch.setattr("kitelm.layers.recurrent.bf16_gemm_path", lambda *args: False)
        plain = block(x, pos, None)
        assert not captured["fused"]
        h = captured["u"] * F.gelu(block.linear_y(x), approximate="tanh")
    assert ((fused.double() - plain.double()).abs() <= _product_bound(h, block.linear_out) + 4 * U * plain.abs()).all()
