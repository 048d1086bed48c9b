"""The decoding fast path: the C++ kernels of `kitelm.ops.decode` against the pure-torch layers they replace, and
token-by-token decoding of every architecture against the full forward."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from kitelm.presets import get_preset
from kitelm.layers.conv1d import Conv1D
from kitelm.layers.norms import RMSNorm
from kitelm.layers.rglru import RGLRU
from kitelm.layers.rope import RotaryEmbedding
from kitelm.models import build_model
from kitelm.ops import decode
from kitelm.ops.extension import disabled_reason
from numerics import assert_fp32_close, matmul_bound, model_reductions

ISAS = decode.available_isas()  # rglru_step's and attend_ring's paths this CPU runs


@pytest.fixture(scope="module")
def kernels():
    """The compiled kernels; skipped only without a compiler (a failed build with one is a bug)."""
    module = decode.EXTENSION.module()
    if module is None:
        if disabled_reason():
            pytest.skip("C++ extensions are disabled by KITELM_NO_CPP")
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler on PATH")
        pytest.fail(f"a C++ compiler is present but the decode kernels did not build: "
                    f"{decode.EXTENSION.unavailable_reason()}")
    return module


@pytest.mark.parametrize("rows, d_in, d_out, bias", [(1, 256, 768, True), (3, 33, 7, False), (8, 130, 65, True)])
def test_small_linear_matches_f_linear(kernels, rows, d_in, d_out, bias):
    x = torch.randn(d_in, rows).t()[:, None]  # [rows, 1, in], not contiguous
    w, b = torch.randn(d_out, d_in), torch.randn(d_out) if bias else None
    error = (kernels.small_linear(x, w, b) - F.linear(x, w, b)).abs()
    assert (error <= matmul_bound(x, w, b)).all()  # elementwise: 2·γ_K · (|x| |w|ᵀ + |b|), tests/numerics.py


@pytest.mark.parametrize("unit_offset", [True, False])
@pytest.mark.parametrize("shape", [(3, 1, 65), (4, 100, 2048)])  # a decoding step; a prefill (rows across threads)
def test_rms_norm_kernel_matches_its_torch_twin(kernels, unit_offset, shape):
    d = shape[-1]
    norm = RMSNorm(d, 1e-6, unit_offset=unit_offset)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(shape) * 3
    with torch.no_grad():
        # the mean of d squares, then rsqrt and the gain: (terms, depth) = (d, 2)
        assert_fp32_close(kernels.rms_norm(x, norm.weight, norm.eps, float(unit_offset)), norm.forward_ref(x), d, 2)
        assert_fp32_close(norm(x), norm.forward_ref(x), d, 2, name="layer")  # the layer takes the kernel here


def _resets(batch: int) -> torch.Tensor:
    """segment_pos [B, 1]: row 0 starts a document at this token, the others continue one."""
    return torch.tensor([[0]] + [[5 + i] for i in range(batch - 1)])


def test_conv1d_step_and_its_twin_match_the_full_forward_and_update_the_state(kernels):
    conv = Conv1D(33, 4)
    torch.nn.init.normal_(conv.b)
    x, state = torch.randn(3, 1, 33), torch.randn(3, 3, 33)
    with torch.no_grad():
        expected, expected_state = conv(x, _resets(3), state)  # the general masked path
        y_ref, state_ref = conv.step_ref(x, _resets(3), state.clone())
        y = kernels.conv1d_step(x, conv.w, conv.b, state, _resets(3) == 0)  # updates `state` in place
    for got, want in ((y_ref, expected), (state_ref, expected_state), (y, expected), (state, expected_state)):
        assert_fp32_close(got, want, terms=4)  # 4 taps and a bias per output


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width, heads", [(64, 1), (64, 4), (72, 2), (2048, 16)])  # blocks of 36: vectors of 16
# (AVX-512) or 8 (AVX2) channels and 4 channels in scalar code; 16 blocks of 128: split over threads
def test_rglru_step_and_its_twin_match_the_scan(kernels, width, heads, isa):
    lru = RGLRU(width, heads)
    for gate in (lru.input_gate, lru.a_gate):
        torch.nn.init.normal_(gate.b)
    x, h0 = torch.randn(3, 1, width), torch.randn(3, width)
    segment_pos = _resets(3)
    with torch.no_grad():
        expected, expected_h = lru(x, segment_pos, h0)  # the scan path
        y_ref, h_ref = lru.step_ref(x, segment_pos, h0)
        h = kernels.rglru_step(x, lru.input_gate.w, lru.input_gate.b, lru.a_gate.w, lru.a_gate.b, F.softplus(lru.a_param), h0,
                               segment_pos == 0, 8.0, decode.ISAS[isa])
    block = width // heads  # the gates' block-diagonal reductions, then sigmoid/exp/sqrt and one step: depth 3
    for got, want in ((h_ref, expected_h), (y_ref, expected), (h, expected_h), (h[:, None], expected)):
        assert_fp32_close(got, want, terms=block, depth=3)


@pytest.mark.parametrize("heads, head_dim, fraction", [(10, 256, 0.5), (3, 12, 1.0), (2, 10, 0.4)])
def test_rope_kernel_matches_float64_rotation(kernels, heads, head_dim, fraction):
    """`rope_rotate` (decoding's rotary embedding) against the rotation in float64 at the same float32 angles
    θ = fl(pos · inv_freq), as both the kernel and the twin compute them: cos and sin within 1 ulp each and two
    products and a sum give |error| ≤ 4u·(|x1| + |x2|) per rotated value, u = 2⁻²⁴; the other dims are copied exactly.
    Positions include a large one (big angles) and a pad (−1, treated as 0); the layer takes the kernel in `pair`."""
    rope = RotaryEmbedding(head_dim, 10_000.0, fraction)
    q, k = torch.randn(3, heads, 1, head_dim), torch.randn(3, 1, 1, head_dim)
    positions = torch.tensor([[7], [70_000], [-1]])
    with torch.no_grad():
        got_q, got_k = rope.pair(q, k, positions)
        direct = kernels.rope_rotate(q, positions, rope.inv_freq(q.device))
    assert torch.equal(got_q, direct)
    angles = (positions.clamp(min=0).unsqueeze(-1).float() * rope.inv_freq(q.device)).double()[:, None]  # [B, 1, 1, r/2]
    half = rope.rotated // 2
    for got, x in ((got_q, q), (got_k, k)):
        x = x.double()
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        want = torch.cat((x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin(), rest), -1)
        bound = 4 * 2.0**-24 * torch.cat(((x1.abs() + x2.abs()),) * 2 + (torch.zeros_like(rest),), -1)
        assert ((got.double() - want).abs() <= bound).all()


def test_steps_take_the_kernels_only_where_they_apply(kernels, monkeypatch):
    """`step` calls the kernel for decoding-sized fp32 inputs without autograd, its twin otherwise."""
    conv, lru = Conv1D(16, 4), RGLRU(16, 2)
    x, pos = torch.randn(2, 1, 16), _resets(2)
    calls = []
    decode.decode_isa()  # resolved once (cached) before the recorder counts calls
    monkeypatch.setattr(decode, "_kernels", lambda: _Recorder(kernels, calls))
    with torch.no_grad():
        conv.step(x, pos, torch.zeros(2, 3, 16))
        lru.step(x, pos, torch.zeros(2, 16))
        conv.double().step(x.double(), pos, torch.zeros(2, 3, 16, dtype=torch.float64))
        lru.double().step(x.double(), pos, torch.zeros(2, 16, dtype=torch.float64))
    conv, lru, x = conv.float(), lru.float(), x.requires_grad_()
    conv.step(x, pos, torch.zeros(2, 3, 16))  # a gradient is being recorded
    lru.step(x, pos, torch.zeros(2, 16))
    assert calls == ["conv1d_step", "rglru_step"]


@pytest.mark.parametrize("blas_streams", [False, True])
def test_fp32_decoding_products_take_small_linear_only_where_blas_does_not_stream(kernels, blas_streams, monkeypatch):
    """`linear` leaves 1-8-row fp32 products to F.linear on CPUs whose BLAS streams them (Intel's MKL) and takes
    `small_linear` elsewhere; both give the product (the kernel within the fp32 reorder bound)."""
    calls = []
    monkeypatch.setattr(decode, "_kernels", lambda: _Recorder(kernels, calls))
    monkeypatch.setattr(decode, "blas_streams_few_rows", lambda: blas_streams)
    x, w, b = torch.randn(3, 64), torch.randn(40, 64), torch.randn(40)
    with torch.no_grad():
        y = decode.linear(x, w, b)
    assert calls == ([] if blas_streams else ["small_linear"])
    assert_fp32_close(y, F.linear(x.double(), w.double(), b.double()), terms=65)


class _Recorder:
    """The kernels module, recording which kernel each call takes."""

    def __init__(self, module, calls: list):
        self.module, self.calls = module, calls

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.module, name)


def test_kernels_serve_only_decoding_sized_fp32_inputs_without_autograd(kernels):
    one = torch.randn(1, 1, 16)
    with torch.no_grad():
        assert decode.decode_kernels(one) is kernels
        assert decode.decode_kernels(torch.randn(decode.MAX_ROWS + 1, 16)) is None
        assert decode.decode_kernels(one.double()) is None
    assert decode.decode_kernels(one) is None  # a gradient may be recorded


def _sequences(vocab: int, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, positions [2, 40]: row 0 left-padded by 3; with `packed`, row 1 holds two documents."""
    t = 40
    ids = torch.randint(0, vocab, (2, t))
    positions = torch.arange(t).repeat(2, 1)
    positions[0, :3] = -1
    positions[0, 3:] = torch.arange(t - 3)
    if packed:
        positions[1, 20:] = torch.arange(t - 20)
    return ids, positions


@pytest.mark.parametrize("preset", ["transformer-tiny", "griffin-tiny", "hawk-tiny", "griffin-sas-tiny", "sas-p-small",
                                    "preln-small"])
@pytest.mark.parametrize("fast", [True, False])
def test_token_by_token_decoding_matches_the_full_forward(preset, fast, monkeypatch):
    """Prefill 5 tokens, then one token per call (the kernels when `fast`, the torch step paths otherwise)."""
    if not fast:
        monkeypatch.setattr(decode, "_kernels", lambda: None)
    config = get_preset(preset)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the identity-like init of the simplified blocks
            p.add_(torch.randn_like(p) * 0.05)
    ids, positions = _sequences(config.vocab_size, packed=config.arch == "griffin")
    with torch.inference_mode():
        full = model(ids, positions)
        cache = model.new_cache(2, max_len=ids.shape[1])
        steps = [model(ids[:, :5], positions[:, :5], cache)]
        steps += [model(ids[:, t:t + 1], positions[:, t:t + 1], cache) for t in range(5, ids.shape[1])]
    real = positions >= 0
    assert_fp32_close(torch.cat(steps, 1)[real], full[real], *model_reductions(config, ids.shape[1]))
