"""kitelm Griffin / Hawk / RecurrentGemma checkpoint → a transformers `RecurrentGemmaForCausalLM` folder
(`kitelm export CHECKPOINT --format hf --out DIR`): config.json, model.safetensors, and tokenizer.model when the
checkpoint has a SentencePiece tokenizer. The inverse of `recurrentgemma.hf_to_kitelm` (docs/griffin.md §5).

transformers' full forward equals the official code only within the attention window (past it, its sliding mask
keeps one key fewer: docs/griffin.md §7), so the export is tested there. Architectures transformers cannot represent
are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import KitelmError
from .recurrentgemma import BLOCK_KEY, HF_BLOCK_KEYS

_KITELM_TO_HF = {v: k for k, v in HF_BLOCK_KEYS.items()}
_KINDS = {"R": "recurrent", "A": "attention"}


def hf_refusal(config) -> str:
    """Why transformers' RecurrentGemma cannot hold this config ("" if it can)."""
    checks = [
        (config.arch == "griffin", f"arch={config.arch!r}: only Griffin/Hawk/RecurrentGemma models export"),
        (config.attention_kind == "mqa", "attention_kind='shaped' (Griffin-SAS) has no transformers equivalent"),
        (config.mlp == "geglu", f"mlp={config.mlp!r}: transformers' RecurrentGemma uses a GeGLU MLP"),
        (config.tie_embeddings, "an untied output head: transformers' RecurrentGemma ties it to the embedding"),
        (config.embed_scale_sqrt, "embed_scale_sqrt=false: transformers always scales the embedding by √width"),
        (config.logit_softcap > 0, "logit_softcap=0: transformers' RecurrentGemma always soft-caps the logits"),
    ]
    return "; ".join(msg for ok, msg in checks if not ok)


def hf_config(config, tokenizer=None):
    import transformers

    kw = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id) if tokenizer is not None and \
        getattr(tokenizer, "bos_id", None) is not None else {}
    return transformers.RecurrentGemmaConfig(
        num_hidden_layers=config.n_layers, vocab_size=config.vocab_size, hidden_size=config.width,
        intermediate_size=2 * config.mlp_width, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, head_dim=config.dim_per_head, lru_width=config.lru_width or config.width,
        attention_window_size=config.attention_window, conv1d_width=config.conv_width,
        logits_soft_cap=config.logit_softcap, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_theta": config.rope_base, "partial_rotary_factor": config.rope_fraction,
                         "rope_type": "default"},
        block_types=[_KINDS[c] for c in config.block_pattern], tie_word_embeddings=True, **kw)


def kitelm_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key == "embed.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["model.final_norm.weight"] = value
        elif (m := BLOCK_KEY.match(key)) and m.group(1) == "blocks":
            i, rest = m.group(2), m.group(3)
            if rest == "temporal_block.conv_1d.w":  # [K, L] → [L, 1, K]
                out[f"model.layers.{i}.temporal_block.conv_1d.weight"] = value.T[:, None, :].contiguous()
            elif rest in _KITELM_TO_HF:
                out[f"model.layers.{i}.{_KITELM_TO_HF[rest]}"] = value
            else:
                raise KitelmError(f"tensor {key} has no transformers RecurrentGemma counterpart")
        else:
            raise KitelmError(f"tensor {key} has no transformers RecurrentGemma counterpart")
    return out


def export_hf(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the kitelm checkpoint (run or checkpoint folder) as a transformers RecurrentGemma folder `out`."""
    import os
    import shutil

    from .. import load
    from ..data.tokenizer import SentencePieceTokenizer

    out = Path(out)
    if out.exists():
        raise KitelmError(f"{out} already exists; choose a new --out folder")
    if dtype not in (torch.float32, torch.bfloat16):
        raise KitelmError("export writes float32 or bfloat16 weights")
    from ..quant import is_quantized
    from ..checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    if is_quantized(folder):
        raise KitelmError(f"{folder} holds quantized weights; export the full-precision checkpoint it came from")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise KitelmError("kitelm export --format hf needs transformers (pip install transformers)") from None
    lm = load(folder, dtype="float32")
    reason = hf_refusal(lm.config)
    if reason:
        raise KitelmError(f"transformers' RecurrentGemmaForCausalLM cannot represent {folder}: {reason}")
    tokenizer = lm.tokenizer if isinstance(lm.tokenizer, SentencePieceTokenizer) else None
    state = {k: v.detach().to(dtype).contiguous() for k, v in kitelm_to_hf(lm.model.state_dict()).items()}
    config = hf_config(lm.config, tokenizer)
    config.architectures = ["RecurrentGemmaForCausalLM"]

    from safetensors.torch import save_file

    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"  # no kitelm manifest: a plain transformers folder
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        os.replace(tmp, out)
    except OSError as err:
        raise KitelmError(f"could not write {out} ({err.strerror or err}); nothing was left behind") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
