"""Decode-path quality: mean next-token NLL of token-by-token decoding (8 sequences at a time: the GEMV path, 8 rows)
on validation windows of the griffin-small checkpoint, per weight format, with KITELM_QUANT_X=fp32 and int8.
Usage: python decode_quality.py CHECKPOINT OUT.json [WINDOWS] [LEN]"""
import json, os, sys, tempfile, time
from pathlib import Path
import torch
import kitelm
from kitelm.data.corpus import load_corpus
from kitelm.data.dataset import prepare_tokens
from kitelm.quant import QuantSpec, quantize_checkpoint

ckpt, out = sys.argv[1], sys.argv[2]
windows = int(sys.argv[3]) if len(sys.argv) > 3 else 16
length = int(sys.argv[4]) if len(sys.argv) > 4 else 256
meta = json.loads((Path(ckpt) / "meta.json").read_text())
base = kitelm.load(ckpt, dtype="float32")
tokens = prepare_tokens(load_corpus(meta["train_config"]["data"]), base.tokenizer).validation
tokens = torch.as_tensor(tokens[: windows * (length + 1)].astype("int64")).reshape(windows, length + 1)


def decode_nll(model) -> float:
    total = 0.0
    with torch.inference_mode():
        for b0 in range(0, windows, 8):
            ids = tokens[b0:b0 + 8]
            cache = model.new_cache(ids.shape[0], length + 1)
            for t in range(length):
                logits = model(ids[:, t:t + 1], cache=cache)[:, -1].float()
                total += torch.nn.functional.cross_entropy(logits, ids[:, t + 1], reduction="sum").item()
    return total / (windows * length)


def full_nll(model) -> float:
    with torch.inference_mode():
        logits = model(tokens[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()


rows = []
t0 = time.time()
ref = decode_nll(base.model)
rows.append({"format": "fp32", "decode_nll": ref, "full_nll": full_nll(base.model)})
print(rows[-1], flush=True)
with tempfile.TemporaryDirectory() as tmp:
    for fmt, group in (("int8", 32), ("int8", 0), ("int4", 64), ("int4", 32)):
        folder = quantize_checkpoint(ckpt, Path(tmp) / f"{fmt}-{group}", QuantSpec(fmt, group))
        lm = kitelm.load(folder)
        row = {"format": f"{fmt} g{group or 'channel'}", "full_nll": full_nll(lm.model)}
        for xf in ("fp32", "int8"):
            os.environ["KITELM_QUANT_X"] = xf
            row[f"decode_nll_x_{xf}"] = decode_nll(lm.model)
            row[f"delta_pct_x_{xf}"] = round(100 * (row[f"decode_nll_x_{xf}"] - ref) / ref, 4)
        os.environ.pop("KITELM_QUANT_X")
        row["x_int8_minus_x_fp32_pct"] = round(row["delta_pct_x_int8"] - row["delta_pct_x_fp32"], 4)
        rows.append(row)
        print(row, flush=True)
Path(out).write_text(json.dumps({"checkpoint": ckpt, "windows": windows, "length": length, "rows": rows,
                                 "seconds": round(time.time() - t0)}, indent=1) + "\n")
