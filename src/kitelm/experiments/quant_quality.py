"""Quality of the weight formats: validation loss of a trained checkpoint stored in each format against its
fp32 loss, and the mean KL divergence of next-token distributions, fp32 ‖ format, on a random-weight real-size model
(llama.cpp's convention: KL(p_fp32 ‖ p_quantized) averaged over positions).

    python -m kitelm.experiments.quant_quality loss CHECKPOINT OUT.json
    python -m kitelm.experiments.quant_quality kl recurrentgemma-2b OUT.json [POSITIONS]

Every format goes through the user's path: `kitelm quantize` into a folder, `kitelm eval` on it (loss); the KL run
builds each format from the same seed as `kitelm bench decode` does, one process per format.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FORMATS = (("bf16", -1, True), ("int8", 32, True), ("int8", 0, True), ("int8", 32, False), ("int4", 32, True),
           ("int4", 64, True), ("int4", 128, True), ("int4", 64, False))


def _label(weights: str, group: int, embedding: bool) -> str:
    g = "" if weights == "bf16" else (" per-channel" if group == 0 else f" g{group}")
    return f"{weights}{g}" + ("" if embedding else ", fp32 embedding")


def checkpoint_losses(checkpoint: str | Path, max_tokens: int = 65_536, formats=FORMATS, log=print) -> list[dict]:
    from ..evaluation import evaluate_checkpoint
    from ..quant import QuantSpec, quantize_checkpoint

    def loss(path) -> float:
        return evaluate_checkpoint(path, max_tokens=max_tokens, max_windows=1, extrapolate=1,
                                   out=Path(tmp) / f"eval-{len(rows)}")["loss"]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = loss(checkpoint)
        rows.append({"format": "fp32", "loss": round(base, 5), "delta_pct": 0.0})
        log(f"fp32: {base:.5f}")
        for weights, group, embedding in formats:
            spec = QuantSpec(weights, group, embedding)
            folder = quantize_checkpoint(checkpoint, Path(tmp) / f"q{len(rows)}", spec)
            value = loss(folder)
            rows.append({"format": _label(weights, spec.group_size, embedding), "loss": round(value, 5),
                         "delta_pct": round(100 * (value - base) / base, 3),
                         "bytes": (folder / "model.safetensors").stat().st_size})
            log(f"{rows[-1]['format']}: {value:.5f} ({rows[-1]['delta_pct']:+.3f} %)")
    return rows


def _logits_child(preset: str, weights: str, group: int, embedding: bool, positions: int, out: str) -> None:
    """Logits of one format for a fixed random sequence, saved as a float32 tensor [positions, vocab]."""
    from .bench.decode import random_model

    model = random_model(preset, weights, group, embedding, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, positions), generator=g)
    with torch.inference_mode():
        torch.save(model(ids)[0].float(), out)


def random_model_kl(preset: str, positions: int = 256, formats=FORMATS, log=print) -> list[dict]:
    from .machine import ALLOCATOR_ENV

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def logits(weights, group, embedding) -> torch.Tensor:
            out = Path(tmp) / f"{weights}-{group}-{embedding}.pt"
            code = ("from kitelm.experiments.quant_quality import _logits_child; "
                    f"_logits_child({preset!r}, {weights!r}, {group}, {embedding}, {positions}, {str(out)!r})")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={**os.environ, **ALLOCATOR_ENV})
            if done.returncode:
                raise RuntimeError(done.stderr.strip().splitlines()[-1])
            return torch.load(out, weights_only=True)

        ref_logits = logits("fp32", -1, True).double()
        ref = ref_logits.log_softmax(-1)
        p = ref.exp()
        entropy = float(-(p * ref).sum(-1).mean())
        log(f"fp32: mean entropy {entropy:.4f} nats (uniform over the vocabulary: {math.log(ref.shape[-1]):.4f})")
        for weights, group, embedding in formats:
            q_logits = logits(weights, group, embedding).double()
            lq = q_logits.log_softmax(-1)
            kl = (p * (ref - lq)).sum(-1)
            top1 = (ref.argmax(-1) == lq.argmax(-1)).float().mean().item()
            rel = float((q_logits - ref_logits).square().mean().sqrt() / ref_logits.std(-1).square().mean().sqrt())
            rows.append({"format": _label(weights, group if group != -1 else {"bf16": 0, "int8": 32, "int4": 64}[
                weights], embedding), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                "top1_agreement": round(top1, 4), "logit_rel_rms_error": rel, "fp32_mean_entropy": entropy,
                "positions": positions})
            log(f"{rows[-1]['format']}: mean KL {rows[-1]['mean_kl']:.3e}, top-1 agreement {top1:.3f}, "
                f"logit error {rel:.2e} of the logits' spread")
    return rows


if __name__ == "__main__":
    kind, target, out = sys.argv[1:4]
    if kind == "loss":
        result = checkpoint_losses(target)
    else:
        result = random_model_kl(target, int(sys.argv[4]) if len(sys.argv) > 4 else 256)
    Path(out).write_text(json.dumps({"kind": kind, "target": target, "rows": result}, indent=2) + "\n")
