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

from ...ops.scan import available_backends, linear_scan
from ...plotting import saved_figure
from ...timing import time_runs
from ..machine import dram_bandwidth

FWD_BYTES_PER_ELEM = 12  # fp32: read a, x; write h
FWD_BWD_BYTES_PER_ELEM = 32  # + backward: read a, h, dh; write da, dx
NOTE = ("h_t = a_t·h_{t-1} + x_t in fp32; effective GB/s counts 12 B/elem forward, 32 B/elem forward+backward; "
        "floor = bytes ÷ measured DRAM bandwidth (256 MiB add).")


def run(settings, machine: dict, log) -> list[dict]:
    return run_scan_bench(settings.scan_shapes, settings.repeats)


def run_scan_bench(shapes: Sequence[tuple[int, int, int]], repeats: int = 5) -> list[dict]:
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


def plot(rows: list[dict], settings, out) -> None:
    """Bars: effective fwd+bwd GB/s of each backend per shape, against the measured DRAM bandwidth."""
    shapes = list(dict.fromkeys("×".join(map(str, r["shape"])) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    width = 0.8 / len(backends)
    with saved_figure(out / "scan_bandwidth.png", legend_fontsize=8) as (ax,):
        for i, backend in enumerate(backends):
            values = [next((r["fwd_bwd_gbps"] for r in rows if r["backend"] == backend
                            and "×".join(map(str, r["shape"])) == s), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=backend)
        ax.axhline(rows[0]["bandwidth_gbps"], color="k", ls="--", lw=1, label="DRAM bandwidth")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.set(ylabel="effective GB/s (fwd+bwd, 32 B/elem)", title="Linear scan h_t = a_t h_{t-1} + x_t")
