"""The linear-scan benchmark (`kitelm bench scan`): every backend of `kitelm.ops.linear_scan` against the DRAM
bandwidth floor and the Python-loop reference.

For each [B, T, D] shape and backend it times the forward (no grad) and the forward + backward (grads for a and x),
in fp32 with no h0 and no resets. Effective bandwidth counts the ideal traffic: forward 12 B/elem (read a, x; write h),
forward + backward 32 B/elem (the backward also reads a, h, dh and writes da, dx). The floor is that traffic divided by
the measured DRAM bandwidth of a 256 MiB add. Speed-up is relative to the "ref" loop in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.scan import available_backends, linear_scan
from .machine import dram_bandwidth, time_runs

FWD_BYTES_PER_ELEM = 12  # fp32: read a, x; write h
FWD_BWD_BYTES_PER_ELEM = 32  # + backward: read a, h, dh; write da, dx
DEFAULT_SHAPES = ((8, 4096, 1024), (8, 1024, 256))


def run_scan_bench(shapes: Sequence[tuple[int, int, int]] = DEFAULT_SHAPES, repeats: int = 5) -> list[dict]:
    """One dict per (shape, backend): times in ms, effective GB/s, fraction of the bandwidth floor, speed-up vs ref.

    Keys: shape, backend, threads, bandwidth_gbps, and for mode in (fwd, fwd_bwd): {mode}_ms (fastest run),
    {mode}_ms_median, {mode}_gbps, {mode}_floor_ms (ideal bytes / bandwidth), {mode}_of_floor (floor_ms / ms),
    {mode}_speedup_vs_ref. Like the bandwidth probe, the derived numbers use the fastest run: on a shared machine
    it is the best estimate of what the kernel does alone; the median shows how noisy the machine was.
    """
    bandwidth = dram_bandwidth(repeats=repeats) / 1e9
    rows = []
    for shape in shapes:
        elems = shape[0] * shape[1] * shape[2]
        a = torch.empty(shape).uniform_(0.5, 0.999)
        x = torch.randn(shape)
        dh = torch.randn(shape)
        a_leaf, x_leaf = a.clone().requires_grad_(), x.clone().requires_grad_()

        def forward(backend: str) -> None:
            with torch.no_grad():
                linear_scan(a, x, backend=backend)

        def forward_backward(backend: str) -> None:
            a_leaf.grad = x_leaf.grad = None
            h, _ = linear_scan(a_leaf, x_leaf, backend=backend)
            h.backward(dh)

        shape_rows = []
        for backend in available_backends():
            row = {"shape": tuple(shape), "backend": backend, "threads": torch.get_num_threads(),
                   "bandwidth_gbps": bandwidth}
            for mode, fn, bytes_per_elem in (("fwd", forward, FWD_BYTES_PER_ELEM),
                                             ("fwd_bwd", forward_backward, FWD_BWD_BYTES_PER_ELEM)):
                median_s, best_s = time_runs(lambda: fn(backend), repeats)
                median_ms, ms = 1e3 * median_s, 1e3 * best_s
                floor_ms = elems * bytes_per_elem / bandwidth / 1e6
                row |= {f"{mode}_ms": ms, f"{mode}_ms_median": median_ms,
                        f"{mode}_gbps": elems * bytes_per_elem / ms / 1e6,
                        f"{mode}_floor_ms": floor_ms, f"{mode}_of_floor": floor_ms / ms}
            shape_rows.append(row)
        ref = next(row for row in shape_rows if row["backend"] == "ref")
        for row in shape_rows:
            for mode in ("fwd", "fwd_bwd"):
                row[f"{mode}_speedup_vs_ref"] = ref[f"{mode}_ms"] / row[f"{mode}_ms"]
        rows += shape_rows
    return rows
