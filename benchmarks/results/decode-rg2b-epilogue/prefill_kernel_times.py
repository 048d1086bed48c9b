"""Time a prefill of random-weight RG-2B and the kernels inside it, by wrapping them (benchmarks/NOTES.md, "Prefill
epilogues"): python prefill_kernel_times.py FMT TOKENS, with the bench's allocator environment set."""
import sys, time, torch, collections
from kitelm.experiments.bench.decode import random_model
from kitelm.ops import quant, prefill, decode
fmt, T = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
m = random_model("recurrentgemma-2b", fmt)
acc = collections.defaultdict(float); cnt = collections.Counter()
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[name] += time.perf_counter() - t; cnt[name] += 1; return r
    setattr(mod, name, g)
for mod, names in [(quant._dequant_kernels(), ["dequantize_into"]), (prefill._kernels(), ["gelu_mul", "add_bias_into", "rglru_scan", "conv1d_forward"]), (decode._kernels(), ["rms_norm"])]:
    for n in names: wrap(mod, n)
import torch.nn.functional as F
wrap(F, "linear"); wrap(F, "scaled_dot_product_attention"); wrap(torch, "baddbmm")
with torch.inference_mode():
    ids = torch.randint(0, 256000, (1, T))
    for rep in range(2):
        acc.clear(); cnt.clear()
        cache = m.new_cache(1, max_len=T + 1)
        t = time.perf_counter(); m(ids, cache=cache, logits_to_keep=1); total = time.perf_counter() - t
    print(f"{fmt} T={T} total {total*1e3:.0f} ms; accounted {sum(acc.values())*1e3:.0f}")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]): print(f"  {k:30s} {v*1e3:8.1f} ms  ({cnt[k]} calls)")
