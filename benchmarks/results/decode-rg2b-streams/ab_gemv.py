"""A/B of two builds of csrc/quant_kernels.cpp in one process (benchmarks/NOTES.md, "Two weight streams per core"):
RG-2B's 164 quantized linears in model order and the 256k head, the builds alternating, fastest of 5.

    python ab_gemv.py FMT BASE.cpp NEW.cpp      # FMT: bf16 | int8 | int4; copy csrc/kernel_common.h beside the two sources
"""
import sys
import time

import torch
from torch.utils.cpp_extension import load

from kitelm.experiments.bench.decode import random_model, read_bandwidth
from kitelm.quant.modules import QuantizedLinear

fmt, sources = sys.argv[1], sys.argv[2:4]
torch.set_num_threads(2)
variants = {src: load(name=f"ab_{i}", sources=[src], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
            for i, src in enumerate(sources)}
model = random_model("recurrentgemma-2b", fmt)
linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
head = model.embed.weight
xs = {n: torch.randn(1, n) for n in {lin.in_features for lin in linears}}


def nbytes(storage, scales):
    return storage.numel() * storage.element_size() + (0 if scales is None else scales.numel() * 2)


def call(kernels, x, storage, scales, group):
    if fmt == "bf16":
        return kernels.gemv_bf16(x, storage, None, 2)
    return getattr(kernels, f"gemv_{fmt}")(x, storage, scales, None, group, 3, True)


linear_bytes = sum(nbytes(lin.qweight, lin.scales) for lin in linears)
head_bytes = nbytes(head.storage, head.scales)
with torch.inference_mode():
    times = {src: ([], []) for src in variants}
    for _ in range(5):
        for src, kernels in variants.items():
            t0 = time.perf_counter()
            for lin in linears:
                call(kernels, xs[lin.in_features], lin.qweight, lin.scales, lin.group)
            t1 = time.perf_counter()
            call(kernels, xs[head.shape[1]], head.storage, head.scales, head.group)
            times[src][0].append(t1 - t0)
            times[src][1].append(time.perf_counter() - t1)
    bw = read_bandwidth()
    print(f"{fmt}: read {bw / 1e9:.1f} GB/s; floors: linears {linear_bytes / bw * 1e3:.1f} ms, head {head_bytes / bw * 1e3:.1f} ms")
    for src, (lin_t, head_t) in times.items():
        print(f"  {src}: linears {min(lin_t) * 1e3:.1f} ms ({linear_bytes / min(lin_t) / 1e9:.1f} GB/s), "
              f"head {min(head_t) * 1e3:.1f} ms ({head_bytes / min(head_t) / 1e9:.1f} GB/s)")
