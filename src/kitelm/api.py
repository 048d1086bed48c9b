"""The Python API: `kitelm.load(checkpoint)` → `LM`, a model with its tokenizer and text-level generation."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .convert import detect, load_foreign
from .data.tokenizer import IncrementalDetokenizer, load_tokenizer
from .generate import Sampling, generate_tokens
from .models import build_model
from .precision import inference_dtype
from .quant import is_quantized, load_quantized
from .checkpoint import CONFIG_FILE, load_weights, resolve_checkpoint, verify_checkpoint


class LM:
    """A trained model and its tokenizer.

    >>> lm = kitelm.load("runs/default")
    >>> print(lm.generate("def fibonacci(n):", max_new_tokens=100, temperature=0.8))
    """

    def __init__(self, model, tokenizer, path: Path | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        return ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []) + ids

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 200, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop_at_eos: bool = True) -> Iterator[torch.Tensor]:
        """Token-id generation: yields next ids [B] per step (see `kitelm.generate.generate_tokens`)."""
        return generate_tokens(self.model, prompts, max_new_tokens, Sampling(temperature, top_k, top_p), seed,
                               self.tokenizer.eos_id if stop_at_eos else None)

    def stream(self, prompts: str | list[str], **kwargs) -> Iterator[list[str]]:
        """Yield, per step, the newly completed text of every prompt (multi-byte characters are held back until
        complete)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.stream_ids([self.encode(p) for p in batch], **kwargs)

    def stream_ids(self, prompts: list[list[int]], **kwargs) -> Iterator[list[str]]:
        """`stream` for prompts given as token ids (`generate_ids`' arguments); a row's text ends at EOS. Each row's
        text comes from an `IncrementalDetokenizer`, so a step decodes a few recent ids, not the whole row."""
        rows = [IncrementalDetokenizer(self.tokenizer) for _ in prompts]
        finished = [False] * len(prompts)
        for step in self.generate_ids(prompts, **kwargs):
            pieces = []
            for i, tok in enumerate(step.tolist()):
                finished[i] = finished[i] or tok == self.tokenizer.eos_id
                pieces.append("" if finished[i] else rows[i].push([tok]))
            yield pieces

    def generate(self, prompts: str | list[str], **kwargs) -> str | list[str]:
        """Generate continuations (text only, without the prompt); a list in, a list out."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        out = [""] * len(batch)
        for pieces in self.stream(batch, **kwargs):
            out = [o + p for o, p in zip(out, pieces)]
        return out[0] if isinstance(prompts, str) else out


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto") -> LM:
    """Load a checkpoint folder or a run folder (its newest valid checkpoint), verified first; or a RecurrentGemma
    checkpoint: an HF folder or an official state-dict file, with `tokenizer.model` beside it. `dtype`: the weights'
    dtype, 'auto' (`kitelm.precision.inference_dtype`: float32 on a CPU, bf16 on a GPU that has it), 'float32' or
    'bfloat16'."""
    dtype = inference_dtype(dtype, device)
    if detect(path) is not None:
        model, tokenizer = load_foreign(path, device=device, dtype=dtype)
        return LM(model, tokenizer, Path(path))
    folder = resolve_checkpoint(path)
    if (folder / "manifest.json").exists():
        verify_checkpoint(folder)
    if is_quantized(folder):  # bf16 / int8 / int4 weights (kitelm quantize): memory-mapped, never expanded to fp32
        model, _ = load_quantized(folder, device=device, verify=False)
        return LM(model if dtype == torch.float32 else model.to(dtype), load_tokenizer(folder), folder)
    config = ModelConfig.load(folder / CONFIG_FILE)
    model = build_model(config, device="meta")  # no time spent on random init of weights about to be replaced
    if set(dict(model.named_buffers())) - set(model.state_dict()):  # non-persistent buffers need a real init
        model = build_model(config, device=device)
    else:
        model = model.to_empty(device=device)
    load_weights(model, folder)
    model.eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    return LM(model, load_tokenizer(folder), folder)
