"""Specification of kitelm.ops.scan: every backend of h_t = a_t ⊙ h_{t-1} + x_t matches the float64 loop
`linear_scan_ref` in outputs and in gradients wrt a, x and h0, with and without zero gates (a document start, where
the RG-LRU sets a_t = 0) and initial state."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from kitelm.ops import scan
from kitelm.ops.extension import disabled_reason
from kitelm.ops.scan import available_backends, linear_scan, linear_scan_ref
from numerics import fp32_tolerance

HAS_TRITON = importlib.util.find_spec("triton") is not None
# The triton backend is a GPU kernel; on CPU it runs only under Triton's interpreter, which must be switched on before
# triton is imported: test_triton_backend_under_the_interpreter reruns this file's "triton" cases in a subprocess.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
BACKENDS = ["cpp", "chunked", "ref", "auto"] + (["triton"] if INTERPRETED else [])
# odd T (1 = decode step, 63/65 around one chunk, 257 = 4 chunks + 1), odd D, B = 1 and 3; the two largest are big
# enough for the cpp kernel to go parallel and, as B is not a multiple of the thread count, to split channels too
SHAPES = [(1, 1, 7), (3, 1, 33), (3, 2, 33), (1, 63, 130), (3, 65, 7), (1, 257, 130), (3, 257, 130)]
# one fp32 scan vs the float64 loop: ≤ 257 chained steps, forward and backward (tests/numerics.py)
FP32_RTOL = fp32_tolerance(257, 2)


def require(backend: str) -> None:
    """Skip cpp cases only when no compiler can build the extension; a build failure with a compiler is a bug."""
    if backend != "cpp" or "cpp" in available_backends():
        return
    if disabled_reason():
        pytest.skip("the cpp scan is disabled by KITELM_NO_CPP")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH, so the cpp scan cannot be built")
    pytest.fail(f"a C++ compiler is present but the cpp scan did not build: {scan.EXTENSION.unavailable_reason()}")


def make_inputs(B, T, D, with_h0=True, with_zeros=True, dtype=torch.float32, seed=0):
    """RG-LRU-like gates a ∈ (0.5, 0.999), x ~ N(0, 1); with_zeros: a_t = 0 (a document start) at ~10 % of the (b, t)
    positions and at t = 0 of row 0."""
    g = torch.Generator().manual_seed(seed)
    a = (0.5 + 0.499 * torch.rand(B, T, D, generator=g)).to(dtype)
    x = torch.randn(B, T, D, generator=g).to(dtype)
    h0 = torch.randn(B, D, generator=g).to(dtype) if with_h0 else None
    if with_zeros:
        starts = torch.rand(B, T, generator=g) < 0.1
        starts[0, 0] = True
        a = a.masked_fill(starts.unsqueeze(-1), 0.0)
    return a, x, h0


def scan_and_grads(fn, a, x, h0, seed=1):
    """(h, h_last, da, dx, dh0) for the loss Σ h ⊙ gh + Σ h_last ⊙ gl with fixed random gh, gl."""
    leaves = [t.detach().clone().requires_grad_() for t in (a, x) + ((h0,) if h0 is not None else ())]
    h, h_last = fn(*leaves[:2], leaves[2] if h0 is not None else None)
    g = torch.Generator().manual_seed(seed)
    gh = torch.randn(h.shape, generator=g).to(h.dtype)
    gl = torch.randn(h_last.shape, generator=g).to(h_last.dtype)
    grads = torch.autograd.grad((h * gh).sum() + (h_last * gl).sum(), leaves, materialize_grads=True)
    return (h, h_last, *grads) + ((None,) if h0 is None else ())


def reference(a, x, h0):
    """scan_and_grads of the float64 loop on the same values."""
    as64 = [None if t is None else t.double() for t in (a, x, h0)]
    return scan_and_grads(linear_scan_ref, *as64)


def assert_close_relative(actual, expected, rtol, name):
    """max |actual - expected| ≤ rtol · max |expected| (relative to the tensor's scale, in float64)."""
    error = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} exceeds {rtol:g} × scale {scale:.3g}"


def assert_matches_reference(results, expected, rtol):
    for name, actual, want in zip(("h", "h_last", "da", "dx", "dh0"), results, expected):
        if want is not None:
            assert_close_relative(actual, want, rtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("with_zeros", [False, True], ids=["no_zero_gates", "zero_gates"])
def test_fp32_outputs_and_grads_match_float64_reference(backend, shape, with_h0, with_zeros):
    require(backend)
    a, x, h0 = make_inputs(*shape, with_h0, with_zeros)
    results = scan_and_grads(functools.partial(linear_scan, backend=backend), a, x, h0)
    assert_matches_reference(results, reference(a, x, h0), FP32_RTOL)
    h, h_last = results[:2]
    assert h.dtype == h_last.dtype == torch.float32
    assert torch.equal(h_last, h[:, -1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    require(backend)
    B, T, D = 3, 65, 33
    a, x, h0 = make_inputs(B, T, D)
    # same values, transposed storage
    a_t, x_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (a, x))
    h0_t = h0.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (a_t, x_t, h0_t))
    results = scan_and_grads(functools.partial(linear_scan, backend=backend), a_t, x_t, h0_t)
    assert_matches_reference(results, reference(a, x, h0), FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_stay_float64(backend):
    require(backend)
    a, x, h0 = make_inputs(3, 65, 33, dtype=torch.float64)
    results = scan_and_grads(functools.partial(linear_scan, backend=backend), a, x, h0)
    assert results[0].dtype == results[1].dtype == torch.float64
    assert_matches_reference(results, reference(a, x, h0), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_accumulate_in_fp32(backend):
    require(backend)
    a, x, h0 = make_inputs(3, 257, 33)
    x = x.bfloat16()  # RG-LRU: fp32 gates, activations in the model dtype
    h, h_last, da, dx, dh0 = scan_and_grads(functools.partial(linear_scan, backend=backend), a, x, h0)
    want = reference(a, x, h0)
    assert h.dtype == dx.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    # the state never passes through bf16: only the returned h is rounded
    assert_close_relative(h_last, want[1], FP32_RTOL, "h_last")
    assert_close_relative(h, want[0], 2**-8, "h")
    assert_close_relative(da, want[2], 2**-7, "da")
    assert_close_relative(dh0, want[4], 2**-7, "dh0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gate_drops_state_and_cuts_gradient(backend):
    """a_t = 0 (a document start): h_t = x_t, and nothing after t reaches h0 or the steps before t."""
    require(backend)
    a, x, h0 = make_inputs(2, 9, 16, with_zeros=False)
    a[:, 0] = a[1, 5] = 0.0
    h, *_, dh0 = scan_and_grads(functools.partial(linear_scan, backend=backend), a, x, h0)
    assert torch.equal(h[:, 0], x[:, 0]) and torch.equal(h[1, 5], x[1, 5])
    assert torch.all(dh0 == 0)
    a_leaf, x_leaf = a.clone().requires_grad_(), x.clone().requires_grad_()
    h, h_last = linear_scan(a_leaf, x_leaf, h0, backend=backend)
    da, dx = torch.autograd.grad(h[1, 5:].sum() + h_last[1].sum(), (a_leaf, x_leaf))
    assert torch.all(da[1, :5] == 0) and torch.all(dx[1, :5] == 0)


def test_decode_steps_match_full_scan():
    a, x, h0 = make_inputs(3, 20, 33)
    h_full, last_full = linear_scan(a, x, h0)
    state, steps = h0, []
    for t in range(20):
        h_t, state = linear_scan(a[:, t : t + 1], x[:, t : t + 1], state)
        steps.append(h_t)
    torch.testing.assert_close(torch.cat(steps, dim=1), h_full)
    torch.testing.assert_close(state, last_full)


def test_auto_prefers_cpp_then_chunked():
    x = torch.zeros(2, 8, 4)
    assert scan._resolve_backend("auto", x) == ("cpp" if "cpp" in available_backends() else "chunked")
    assert scan._resolve_backend("auto", x[:, :1]) == scan._resolve_backend("auto", x)


def test_no_cpp_env_falls_back_to_chunked(monkeypatch):
    monkeypatch.setenv("KITELM_NO_CPP", "1")
    assert "cpp" not in available_backends()
    a, x, h0 = make_inputs(3, 65, 33)
    assert scan._resolve_backend("auto", x) == "chunked"
    with pytest.raises(RuntimeError, match="KITELM_NO_CPP"):
        linear_scan(a, x, backend="cpp")
    results = scan_and_grads(linear_scan, a, x, h0)
    assert_matches_reference(results, reference(a, x, h0), FP32_RTOL)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken_build():
        raise RuntimeError(
            "Error building extension 'kitelm_linear_scan': [1/2] c++ -O3 -c linear_scan.cpp\n"
            "FAILED: linear_scan.o\n/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(scan.EXTENSION, "build", broken_build)
    monkeypatch.setattr(scan.EXTENSION, "_loaded", None)
    monkeypatch.delenv("KITELM_NO_CPP", raising=False)
    a, x, h0 = make_inputs(3, 65, 33)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = scan_and_grads(linear_scan, a, x, h0)
        linear_scan(a, x)
    assert len(caught) == 1
    assert "'chunked'" in str(caught[0].message) and "/bin/sh: 1: c++: not found" in str(caught[0].message)
    assert available_backends() == ["chunked", "ref"]
    assert_matches_reference(results, reference(a, x, h0), FP32_RTOL)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (it is in the test extra on Linux x86-64)")
@pytest.mark.skipif(INTERPRETED, reason="this is the driver; the interpreted cases run in this process already")
def test_triton_backend_under_the_interpreter():
    """Every backend-parametrized test above, for backend="triton", run by Triton's CPU interpreter (T = 257 left
    out: the kernel loops over T sequentially, so it adds interpreter time and no case that T = 63 / 65 lacks)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "triton and not 257"],  # T = 257 adds ~45 s of interpreter time and no new case
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 8, 4)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="runs on CUDA tensors .* TRITON_INTERPRET=1"):
            linear_scan(x, x, backend="triton")
    else:
        with pytest.raises(RuntimeError, match="pip install triton"):
            linear_scan(x, x, backend="triton")


def test_env_var_forces_backend(monkeypatch):
    x = torch.zeros(2, 8, 4)
    monkeypatch.setenv("KITELM_SCAN_BACKEND", "ref")
    assert scan._resolve_backend("auto", x) == "ref"
    assert scan._resolve_backend("chunked", x) == "chunked"  # an explicit argument wins
    monkeypatch.setenv("KITELM_SCAN_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        linear_scan(x, x)


@pytest.mark.parametrize(
    ("a_shape", "h0_shape", "message"),
    [
        ((2, 8, 5), None, "a and x must both be"),
        ((2, 8, 4), (2, 5), "h0 must be"),
    ],
)
def test_invalid_inputs_raise_actionable_errors(a_shape, h0_shape, message):
    x = torch.zeros(2, 8, 4)
    h0 = None if h0_shape is None else torch.zeros(h0_shape)
    with pytest.raises(ValueError, match=message):
        linear_scan(torch.zeros(a_shape), x, h0)


def test_empty_sequence_is_rejected():
    with pytest.raises(ValueError, match="T == 0"):
        linear_scan(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4))
