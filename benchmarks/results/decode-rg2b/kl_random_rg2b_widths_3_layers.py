import torch, json, time
from kitelm.presets import get_preset
from kitelm.models import build_model
from kitelm.quant import QuantSpec, quantize_model
cfg = get_preset("recurrentgemma-2b").replace(n_layers=3)
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, cfg.vocab_size, (1, 256), generator=g)
def logits(spec):
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    if spec is not None: quantize_model(m, spec)
    with torch.inference_mode():
        return m(ids)[0].float().log_softmax(-1)
ref = logits(None); p = ref.exp()
rows = []
for w, gs, e in (("bf16", -1, True), ("int8", 32, True), ("int8", 0, True), ("int4", 64, True), ("int4", 32, True), ("int4", 64, False)):
    lq = logits(QuantSpec(w, gs, e))
    kl = (p * (ref - lq)).sum(-1)
    rows.append({"format": f"{w} g{gs} emb={e}", "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1": float((ref.argmax(-1) == lq.argmax(-1)).float().mean())})
    print(rows[-1], flush=True)
json.dump(rows, open("/tmp/q14/kl3.json", "w"), indent=2)
