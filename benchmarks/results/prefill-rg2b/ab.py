"""RG-2B prefill A/B in one process, interleaved (one format per process; model built once):
before = full logits + the old tiled path (quant_kernels.dequantize per 4 M-weight tile, bf16 tiled too) + torch
RG-LRU/Conv1D; keep1 = before but last-token logits; after = the current code (logits_to_keep=1)."""
import json, resource, sys, time
import torch
import torch.nn.functional as F
import kitelm.layers.conv1d as CV
import kitelm.layers.rglru as RG
from kitelm.experiments.bench.decode import random_model, prefill_flops
from kitelm.experiments.machine import gemm_peak_flops
from kitelm.ops import quant as Q

fmt = sys.argv[1]
K = Q._kernels()
new_tiled, new_pk_rg, new_pk_cv = Q._tiled_linear, RG.prefill_kernels, CV.prefill_kernels

def old_tiled(x, storage, scales, bias, fmt, group, kernels):
    compute = Q.gemm_dtype(x)
    out, inp = storage.shape[0], x.shape[-1]
    xt = x.reshape(-1, inp).to(compute).T
    yt = torch.empty(out, xt.shape[1], dtype=compute)
    step = max(1, (1 << 22) // inp)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        tile = storage[r0:r1] if fmt == "bf16" else K.dequantize(storage[r0:r1], scales[r0:r1], inp, group, fmt == "int4", compute)
        torch.mm(tile, xt, out=yt[r0:r1])
    y = yt.T.to(x.dtype).reshape(*x.shape[:-1], out)
    return y if bias is None else y + bias.to(x.dtype)

def mode(name):
    old = name != "after"
    Q._tiled_linear = old_tiled if old else new_tiled
    RG.prefill_kernels = (lambda x: None) if old else new_pk_rg
    CV.prefill_kernels = (lambda x: None) if old else new_pk_cv
    return 0 if name == "before" else 1

t0 = time.perf_counter()
model = random_model("recurrentgemma-2b", fmt)
print(f"{fmt}: built in {time.perf_counter() - t0:.0f} s", flush=True)
T_BUILD = time.perf_counter()
config = model.config
peak = gemm_peak_flops(2048, torch.bfloat16, repeats=5, warmup=1)
res = {"format": fmt, "gemm_peak_GFLOPs": round(peak / 1e9)}
def run(length, name):
    keep = mode(name)
    ids = torch.randint(0, config.vocab_size, (1, length))
    cache = model.new_cache(1, max_len=length + 1)
    s = time.perf_counter()
    out = model(ids, cache=cache, logits_to_keep=keep)
    dt = time.perf_counter() - s
    del out
    return dt
plan = [(512, ["after", "before"], 1), (64, ["after", "before"], 2), (2048, ["after"], 1), (512, ["keep1", "after", "before"], 1), (2048, ["before"], 1)]
T0 = time.perf_counter()
with torch.inference_mode():
    run(16, "after"); run(16, "before")
    for length, names, reps in plan:
        if names == ["before"] and length == 2048 and time.perf_counter() - T0 > 100:
            print("skipping the 2048-token before pass (time)", flush=True)
            continue
        times = {n: [] for n in names}
        for _ in range(reps):
            for n in names:
                times[n].append(run(length, n))
                print(f"  {n} {length}: {times[n][-1]:.2f} s = {length / times[n][-1]:.1f} tok/s "
                      f"(of bound {prefill_flops(config, length) / peak / times[n][-1]:.3f}) at {time.perf_counter() - T0:.0f} s", flush=True)
                if length == 2048:
                    res[f"maxrss_GB_after_{n}_2048"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
        fl = prefill_flops(config, length)
        for n, v in times.items():
            best = min(v)
            res[f"{n}{length}_tok_s"] = round(length / best, 1)
            res[f"{n}{length}_of_bound"] = round(fl / peak / best, 3)
        print(json.dumps({k: v for k, v in res.items() if str(length) in k}), flush=True)
print("RESULT " + json.dumps(res), flush=True)
