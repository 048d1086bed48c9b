"""Diagonal linear recurrence, the scan inside Griffin's RG-LRU (De et al., 2024):

    h_t = a_t ⊙ h_{t-1} + x_t,   h_{-1} = h0 (zeros if not given),   a, x: [B, T, D]

Document resets are folded into `a` by the caller: a_t = 0 at a document start, so h_t = x_t (layers/rglru.py).

The backward pass of every backend is the reverse scan (g_t = dL/dh_t through the recurrence):

    g_{T-1} = dh_{T-1} + dh_last,  g_t = dh_t + a_{t+1} g_{t+1},  dx_t = g_t,  da_t = g_t h_{t-1},  dh0 = a_0 g_0

Backends (`linear_scan(..., backend=...)`), all differentiable wrt a, x and h0:
  * "cpp": a C++ extension (csrc/linear_scan.cpp), sequential over T, vectorised over D, parallel over batch rows.
    Built on first use (`extension.py`: about 45 s cold, then cached).
    Its speed against the DRAM-bandwidth floor: benchmarks/NOTES.md.
  * "triton": Triton kernels (`triton_scan.py`), the same sequential-over-T, parallel-over-(B, D) scan for GPUs.
    Needs the `triton` package; on CPU only under Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
    Tested in interpreter mode (tests/test_scan.py); its GPU speed is not measured here.
  * "chunked": pure torch, chunks of 64 steps scanned in parallel, then a short scan over chunk boundaries, with a
    hand-written reverse-scan backward. The fallback when there is no compiler, and on GPU without Triton.
  * "ref": `linear_scan_ref`, the plain loop over time (in the accumulation dtype).
"auto" picks "cpp" for CPU tensors when the extension builds, "triton" for GPU tensors when Triton is installed,
otherwise "chunked". (A decoding step of the RG-LRU does not come here: `RGLRU.step` is one fused op.)

Environment: KITELM_SCAN_BACKEND=<name> replaces "auto" with that backend; KITELM_NO_CPP=1 never builds the extension.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from .extension import CppExtension

CHUNK = 64  # chunked scan: C = 64 balances the C-step in-chunk loop against the T/C-step carry loop at T ~ 4096
BACKENDS = ("cpp", "triton", "chunked", "ref")


def linear_scan(
    a: Tensor, x: Tensor, h0: Tensor | None = None, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Scan h_t = a_t ⊙ h_{t-1} + x_t over t (see the module docstring for the backward pass).

    a, x: [B, T, D] floating tensors (their dtypes may differ, e.g. fp32 gates with bf16 inputs);
    h0: [B, D] or None (zeros).
    Accumulates in float32 whatever the input dtype (float64 if a or x is float64).
    Returns (h [B, T, D] in x.dtype, h_last [B, D] in the accumulation dtype).
    """
    _check_inputs(a, x, h0)
    acc = torch.float64 if torch.float64 in (a.dtype, x.dtype) else torch.float32
    name = _resolve_backend(backend, x)
    a_acc, x_acc = a.to(acc), x.to(acc)
    h0_acc = None if h0 is None else h0.to(acc)
    if name == "cpp":
        h, h_last = _CppScan.apply(a_acc.contiguous(), x_acc.contiguous(),
                                   None if h0_acc is None else h0_acc.contiguous())
    elif name == "triton":
        from .triton_scan import TritonScan

        h, h_last = TritonScan.apply(a_acc.contiguous(), x_acc.contiguous(),
                                     None if h0_acc is None else h0_acc.contiguous())
    elif name == "chunked":
        h, h_last = _ChunkedScan.apply(a_acc, x_acc, h0_acc)
    else:
        h, h_last = linear_scan_ref(a_acc, x_acc, h0_acc, dtype=acc)
    return h.to(x.dtype), h_last


def linear_scan_ref(
    a: Tensor, x: Tensor, h0: Tensor | None = None, *, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Reference scan: a plain loop over t in `dtype` (float64 by default), differentiated by autograd.

    Same arguments as `linear_scan`; returns (h [B, T, D], h_last [B, D]), both in `dtype`.
    The loop uses unbind/stack: indexing x[:, t] under autograd makes the backward O(T²), as every step's
    gradient is materialised as a full-size [B, T, D] tensor.
    """
    _check_inputs(a, x, h0)
    a = a.to(dtype)
    h = x.new_zeros(x.shape[0], x.shape[2], dtype=dtype) if h0 is None else h0.to(dtype)
    states = []
    for a_t, x_t in zip(a.unbind(1), x.to(dtype).unbind(1)):
        h = a_t * h + x_t
        states.append(h)
    return torch.stack(states, dim=1), h


def available_backends() -> list[str]:
    """Names `linear_scan(backend=...)` accepts for CPU tensors here (builds the C++ extension if not yet built);
    "triton" is for CUDA tensors."""
    return [name for name in BACKENDS if name != "triton" and (name != "cpp" or _cpp_extension() is not None)]


def _check_inputs(a: Tensor, x: Tensor, h0: Tensor | None) -> None:
    if x.dim() != 3 or a.shape != x.shape:
        raise ValueError(f"a and x must both be [B, T, D]; got a {tuple(a.shape)} and x {tuple(x.shape)}")
    if not (a.is_floating_point() and x.is_floating_point()):
        raise ValueError(f"a and x must be floating point; got {a.dtype} and {x.dtype}")
    B, T, D = x.shape
    if T == 0:
        raise ValueError("the sequence is empty (T == 0); there is nothing to scan")
    if h0 is not None and (h0.shape != (B, D) or not h0.is_floating_point()):
        raise ValueError(f"h0 must be a floating [B, D] = [{B}, {D}] tensor; got {h0.dtype} {tuple(h0.shape)}")
    devices = {t.device for t in (a, x, h0) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def _resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that runs, one of BACKENDS. Raises if an explicitly named one cannot run here."""
    if backend == "auto":
        backend = os.environ.get("KITELM_SCAN_BACKEND", "auto")
    if backend == "auto":
        if x.device.type == "cpu":
            return "cpp" if _cpp_extension() is not None else "chunked"
        return "triton" if x.is_cuda and _triton_installed() else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
    if backend == "cpp":
        if x.device.type != "cpu":
            raise ValueError(f"the cpp scan backend runs on CPU tensors only; got {x.device} (use 'chunked')")
        if _cpp_extension() is None:
            raise RuntimeError(f"the cpp scan backend is unavailable: {EXTENSION.unavailable_reason()}")
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError("the triton scan backend needs the triton package: pip install triton")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
            raise ValueError(f"the triton scan backend runs on CUDA tensors (got {x.device}) or, for testing, on CPU "
                             "under TRITON_INTERPRET=1")
    return backend


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------------------------- cpp

EXTENSION = CppExtension("linear_scan", fallback="using the slower pure-torch 'chunked' scan")


def _cpp_extension() -> ModuleType | None:
    """The compiled extension, or None if KITELM_NO_CPP is set or it does not build (warned once)."""
    return EXTENSION.module()


class _CppScan(torch.autograd.Function):
    """Autograd wrapper of the C++ forward and reverse-scan backward (contiguous fp32/fp64 inputs)."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        h, h_last = EXTENSION.module().forward(a, x, h0)
        ctx.save_for_backward(a, h, h0)
        return h, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor, dh_last: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        a, h, h0 = ctx.saved_tensors
        da, dx, dh0 = EXTENSION.module().backward(a, h, h0, dh.contiguous(), dh_last.contiguous())
        return da, dx, (dh0 if h0 is not None else None)


# ------------------------------------------------------------------------------------------------------------ chunked


def _chunked_scan(a: Tensor, x: Tensor, h0: Tensor | None, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """Chunked scan without autograd: h [B, T, D] and the final state [B, D] (state at t=0 when reverse).

    With reverse=True it runs right to left: h_t = a_t ⊙ h_{t+1} + x_t, h_T = h0.
    1. pad T to a multiple of C with a=1, x=0 (neutral steps) and view as [B, T/C, C, D];
    2. scan inside every chunk at once (C steps on [B, T/C, D] slices), also accumulating A = Π a within the chunk;
    3. scan the chunk-end states over the T/C chunks to get the state entering each chunk;
    4. h = h_local + A ⊙ (state entering the chunk).
    """
    B, T, D = x.shape
    C = min(CHUNK, T)
    pad = -T % C
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad), value=1.0)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    n_chunks = (T + pad) // C
    a = a.reshape(B, n_chunks, C, D)
    x = x.reshape(B, n_chunks, C, D)
    h = torch.empty_like(x)
    A = torch.empty_like(a)
    steps = range(C - 1, -1, -1) if reverse else range(C)
    h[:, :, steps[0]] = x[:, :, steps[0]]
    A[:, :, steps[0]] = a[:, :, steps[0]]
    for prev, t in zip(steps[:-1], steps[1:]):
        torch.addcmul(x[:, :, t], a[:, :, t], h[:, :, prev], out=h[:, :, t])
        torch.mul(a[:, :, t], A[:, :, prev], out=A[:, :, t])
    chunk_end_h, chunk_end_A = h[:, :, steps[-1]], A[:, :, steps[-1]]
    entering = torch.empty_like(chunk_end_h)
    state = torch.zeros_like(chunk_end_h[:, 0]) if h0 is None else h0
    for k in range(n_chunks - 1, -1, -1) if reverse else range(n_chunks):
        entering[:, k] = state
        state = torch.addcmul(chunk_end_h[:, k], chunk_end_A[:, k], state)
    h.addcmul_(A, entering.unsqueeze(2))
    h = h.reshape(B, T + pad, D)
    return (h[:, :T].contiguous() if pad else h), state


class _ChunkedScan(torch.autograd.Function):
    """Autograd wrapper of the chunked forward and its reverse-scan backward."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        h, _ = _chunked_scan(a, x, h0)
        ctx.save_for_backward(a, h, h0)
        return h, h[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor, dh_last: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        a, h, h0 = ctx.saved_tensors
        # g_t = a_{t+1} g_{t+1} + dh_t read right to left, entering with g_T = dh_last and a_T = 1.
        a_next = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1)
        g, g_0 = _chunked_scan(a_next, dh, dh_last, reverse=True)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]) if h0 is None else h0.unsqueeze(1), h[:, :-1]], dim=1)
        dh0 = a[:, 0] * g_0 if h0 is not None else None
        return g * h_prev, g, dh0
