"""Prefill kernels (csrc/prefill_kernels.cpp) against their pure-torch twins on random inputs.

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

import pytest
import torch

from kitelm.layers.rglru import C, RGLRU
from kitelm.ops import prefill
from kitelm.ops.scan import linear_scan

U = 2.0**-24
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
    assert calls == [False, prefill._kernels().best_isa() >= prefill.ISAS["avx512"], False]


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
