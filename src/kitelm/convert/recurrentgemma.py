"""Load RecurrentGemma / Griffin checkpoints from the two public formats into a kitelm `Griffin`.

(a) the official PyTorch state dict (GDM `recurrentgemma/torch`, the Kaggle "PyTorch" files), one file loaded with
    `torch.load(..., weights_only=True)`; it holds no config, so sizes are read off the tensor shapes and the rest
    (window 2048, √D embedding scale, soft-cap 30) are RecurrentGemma's unless given;
(b) a Hugging Face folder: `config.json` (model_type "recurrent_gemma") + `model.safetensors` or sharded
    `model-XXXXX-of-YYYYY.safetensors` with `model.safetensors.index.json`.

Key maps (GDM ↔ kitelm, HF ↔ kitelm) are the tables below. Every load is strict: missing, unexpected and mis-shaped tensors
are listed in one `CheckpointError`.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import check_state, write_folder, write_model
from ..config import ModelConfig
from ..errors import CheckpointError, KitelmError
from ..models import build_model

HF_INDEX = "model.safetensors.index.json"

# GDM torch key (after `blocks.{i}.`) → kitelm key; `ffw_up` is split by hand (one [2, D, M] tensor → gate, up).
_GDM_BLOCK = {
    "temporal_pre_norm.scale": "temporal_pre_norm.weight",
    "channel_pre_norm.scale": "channel_pre_norm.weight",
    "mlp_block.ffw_down.weight": "mlp.down.weight",
    "mlp_block.ffw_down.bias": "mlp.down.bias",
    **{f"recurrent_block.{n}": f"temporal_block.{n}" for n in (
        "linear_x.weight", "linear_x.bias", "linear_y.weight", "linear_y.bias", "linear_out.weight",
        "linear_out.bias", "conv_1d.w", "conv_1d.b", "rg_lru.a_param", "rg_lru.input_gate.w", "rg_lru.input_gate.b",
        "rg_lru.a_gate.w", "rg_lru.a_gate.b")},
    **{f"attention_block.{n}": f"temporal_block.{n}" for n in (
        "proj_q.weight", "proj_k.weight", "proj_v.weight", "proj_final.weight", "proj_final.bias")},
}
# HF key (after `model.layers.{i}.`) → kitelm key; `conv_1d.weight` [L, 1, K] is transposed by hand to [K, L].
HF_BLOCK_KEYS = {
    "temporal_pre_norm.weight": "temporal_pre_norm.weight",
    "channel_pre_norm.weight": "channel_pre_norm.weight",
    **{f"mlp_block.{n}_proj.{p}": f"mlp.{n}.{p}" for n in ("gate", "up", "down") for p in ("weight", "bias")},
    **{f"temporal_block.{n}": f"temporal_block.{n}" for n in (
        "linear_x.weight", "linear_x.bias", "linear_y.weight", "linear_y.bias", "linear_out.weight",
        "linear_out.bias")},
    "temporal_block.conv_1d.bias": "temporal_block.conv_1d.b",
    "temporal_block.rg_lru.recurrent_param": "temporal_block.rg_lru.a_param",
    "temporal_block.rg_lru.input_gate_weight": "temporal_block.rg_lru.input_gate.w",
    "temporal_block.rg_lru.input_gate_bias": "temporal_block.rg_lru.input_gate.b",
    "temporal_block.rg_lru.recurrent_gate_weight": "temporal_block.rg_lru.a_gate.w",
    "temporal_block.rg_lru.recurrent_gate_bias": "temporal_block.rg_lru.a_gate.b",
    "temporal_block.q_proj.weight": "temporal_block.proj_q.weight",
    "temporal_block.k_proj.weight": "temporal_block.proj_k.weight",
    "temporal_block.v_proj.weight": "temporal_block.proj_v.weight",
    "temporal_block.o_proj.weight": "temporal_block.proj_final.weight",
    "temporal_block.o_proj.bias": "temporal_block.proj_final.bias",
}
BLOCK_KEY = re.compile(r"^(?:model\.)?(blocks|layers)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------------------- GDM
def config_from_gdm_state(state: dict[str, torch.Tensor], name: str = "recurrentgemma", attention_window: int = 2048,
                          embed_scale_sqrt: bool = True, logit_softcap: float = 30.0) -> ModelConfig:
    """Sizes from tensor shapes (not GDM's `from_torch_params`, whose head count is wrong: common.py:383-387)."""
    if "embedder.input_embedding" not in state or not any(k.startswith("blocks.") for k in state):
        raise CheckpointError("not an official RecurrentGemma/Griffin state dict: no 'embedder.input_embedding' or "
                              f"'blocks.*' tensors (found e.g. {sorted(state)[:3]})")
    vocab, width = state["embedder.input_embedding"].shape
    n_layers = 1 + max(int(m.group(2)) for k in state if (m := BLOCK_KEY.match(k)))
    kinds = ["R" if f"blocks.{i}.recurrent_block.linear_x.weight" in state else "A" for i in range(n_layers)]
    recurrent = kinds.index("R") if "R" in kinds else None
    attention = kinds.index("A") if "A" in kinds else None
    if recurrent is not None:
        n_heads = state[f"blocks.{recurrent}.recurrent_block.rg_lru.a_gate.w"].shape[0]
        lru_width = state[f"blocks.{recurrent}.recurrent_block.rg_lru.a_param"].shape[0]
    else:
        lru_width = None
    head_dim = state[f"blocks.{attention}.attention_block.proj_k.weight"].shape[0] if attention is not None else None
    if recurrent is None:
        n_heads = width // head_dim
    mlp_hidden = state["blocks.0.mlp_block.ffw_up.w"].shape[-1]
    return ModelConfig(name=name, arch="griffin", vocab_size=vocab, width=width, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=1, head_dim=head_dim if head_dim not in (None, width // n_heads) else None,
                       mlp="geglu", mlp_hidden=mlp_hidden, rope_fraction=0.5, lru_width=lru_width,
                       attention_window=attention_window, block_pattern=_pattern(kinds),
                       embed_scale_sqrt=embed_scale_sqrt, logit_softcap=logit_softcap, max_seq_len=8192)


def gdm_to_kitelm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official torch state dict to kitelm names (unknown keys are kept as they are, to be reported)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "embedder.input_embedding":
            out["embed.weight"] = value
        elif key == "final_norm.scale":
            out["norm.weight"] = value
        elif (m := BLOCK_KEY.match(key)) and m.group(1) == "blocks":
            i, rest = m.group(2), m.group(3)
            if rest == "mlp_block.ffw_up.w":  # [2, D, M]: branch 0 is the GeLU gate (GDM torch/modules.py:735)
                out[f"blocks.{i}.mlp.gate.weight"], out[f"blocks.{i}.mlp.up.weight"] = value[0].T, value[1].T
            elif rest == "mlp_block.ffw_up.b":  # [2, 1, 1, M]
                out[f"blocks.{i}.mlp.gate.bias"], out[f"blocks.{i}.mlp.up.bias"] = value[0, 0, 0], value[1, 0, 0]
            else:
                out[f"blocks.{i}.{_GDM_BLOCK.get(rest, rest)}"] = value
        else:
            out[key] = value
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------- HF
def config_from_hf(data: dict, name: str = "recurrentgemma") -> ModelConfig:
    """`RecurrentGemmaConfig` fields → ModelConfig. HF's intermediate_size is 2× the MLP width (its MLP halves it per
    branch: RecurrentGemmaMlp); HF always
    scales the embedding and soft-caps."""
    if data.get("model_type") != "recurrent_gemma":
        raise CheckpointError(f"config.json has model_type={data.get('model_type')!r}; only 'recurrent_gemma' "
                              "(RecurrentGemma) checkpoints can be converted")
    try:
        rope = data.get("rope_parameters") or {}
        kinds = [{"recurrent": "R", "attention": "A"}[t] for t in data["block_types"]]
        n_layers = data["num_hidden_layers"]
        width, n_heads = data["hidden_size"], data["num_attention_heads"]
        head_dim = data.get("head_dim") or width // n_heads
        return ModelConfig(
            name=name, arch="griffin", vocab_size=data["vocab_size"], width=width, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=data.get("num_key_value_heads") or n_heads,
            head_dim=head_dim if head_dim != width // n_heads else None, mlp="geglu",
            mlp_hidden=data["intermediate_size"] // 2, norm_eps=data.get("rms_norm_eps", 1e-6),
            rope_base=rope.get("rope_theta", data.get("rope_theta", 10_000.0)),
            rope_fraction=rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 0.5)),
            lru_width=data.get("lru_width") or width, conv_width=data.get("conv1d_width", 4),
            attention_window=data.get("attention_window_size", 2048),
            block_pattern=_pattern([kinds[i % len(kinds)] for i in range(n_layers)]),
            embed_scale_sqrt=True, logit_softcap=data.get("logits_soft_cap", 30.0), max_seq_len=8192)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"RecurrentGemma config.json lacks or mangles field {err}") from None


def hf_to_kitelm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF RecurrentGemma state dict to kitelm names; `lm_head.weight` (a tied copy) is dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "model.embed_tokens.weight":
            out["embed.weight"] = value
        elif key == "model.final_norm.weight":
            out["norm.weight"] = value
        elif key == "lm_head.weight":
            continue
        elif (m := BLOCK_KEY.match(key)) and m.group(1) == "layers":
            i, rest = m.group(2), m.group(3)
            if rest == "temporal_block.conv_1d.weight":  # [L, 1, K] → [K, L]: nn.Conv1d taps run oldest first, as w
                out[f"blocks.{i}.temporal_block.conv_1d.w"] = value[:, 0, :].T
            else:
                out[f"blocks.{i}.{HF_BLOCK_KEYS.get(rest, rest)}"] = value
        else:
            out[key] = value
    return {k: v.contiguous() for k, v in out.items()}


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / 'config.json'} is unreadable ({err})") from None
    config = config_from_hf(data, name=folder.name or "recurrentgemma")
    if (folder / HF_INDEX).exists():
        try:
            files = sorted(set(json.loads((folder / HF_INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{folder / HF_INDEX} is corrupt ({err})") from None
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(folder / name))
        except FileNotFoundError:
            raise CheckpointError(f"{folder / name} is missing (listed in {HF_INDEX})") from None
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{folder / name} is corrupt or truncated ({err})") from None
    return config, hf_to_kitelm(state)


def read_gdm_file(path: Path, **config_overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a Python object: never unpickled
        raise CheckpointError(f"{path} holds pickled Python objects besides tensors, which kitelm never loads; "
                              "save the plain state dict (torch.save(model.state_dict(), path)) and convert that") from None
    except Exception as err:  # torch raises many kinds of errors on non-checkpoint files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{path} is not a PyTorch state dict ({err.__class__.__name__}: {first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    config = config_from_gdm_state(state, name=path.stem, **config_overrides)
    return config, gdm_to_kitelm(state)


# ------------------------------------------------------------------------------------------------------- common
def detect(path: str | Path) -> str | None:
    """'hf' for a RecurrentGemma HF folder, 'gdm' for a state-dict file, None for anything else (e.g. kitelm)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "gdm"
    if path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").exists():
        try:
            data = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(data, dict) and "model_type" in data:
            return "hf"
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **config_overrides):
    """A `Griffin` with the weights of an HF folder or an official state-dict file, loaded strictly, in the
    checkpoint's dtype unless `dtype` is given."""
    path = Path(path)
    kind = detect(path)
    if kind == "hf":
        config, state = read_hf_folder(path)
    elif kind == "gdm":
        config, state = read_gdm_file(path, **config_overrides)
    else:
        raise CheckpointError(f"{path} is neither a RecurrentGemma HF folder (config.json + safetensors) nor an "
                              "official state-dict file (.pt/.pth/.bin/.ckpt)")
    model = build_model(config, device="meta")  # the checkpoint's tensors replace the meta ones: no second copy
    load_state_strict(model, state, str(path))
    model = model.to(device).eval()
    return model.to(dtype) if dtype is not None else model


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Put `state`'s tensors into `model` as they are (assigned, not copied: a meta model needs no memory of its
    own); any missing, unexpected or mis-shaped tensor raises one CheckpointError that lists them."""
    check_state(state, model.state_dict(), source, f"a {model.config.arch} model")
    model.load_state_dict(state, assign=True)


def find_tokenizer(path: Path, tokenizer: str | Path | None):
    """The SentencePiece tokenizer given, or `tokenizer.model` beside the checkpoint, or None."""
    from ..data.tokenizer import SentencePieceTokenizer

    if tokenizer is not None:
        return SentencePieceTokenizer.from_file(tokenizer)
    candidate = (path if path.is_dir() else path.parent) / "tokenizer.model"
    return SentencePieceTokenizer.from_file(candidate) if candidate.is_file() else None


def _pattern(kinds: list[str]) -> str:
    """The shortest string whose cycle gives `kinds` (e.g. RRARRARR → RRA)."""
    n = next(n for n in range(1, len(kinds) + 1) if all(k == kinds[i % n] for i, k in enumerate(kinds)))
    return "".join(kinds[:n])


CHAT_TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")  # transformers' homes of a chat template


def convert(src: str | Path, out: str | Path, tokenizer: str | Path | None = None, **config_overrides) -> Path:
    """Write `src` (HF folder or official state-dict file) as a kitelm checkpoint folder `out`: model.safetensors,
    config.json, tokenizer.model, manifest.json, and the chat template files beside `src` or the tokenizer (kept
    as they are). Written into a hidden temporary folder, then renamed: a failure
    leaves nothing behind."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise KitelmError(f"{src} does not exist; pass an HF RecurrentGemma folder or an official state-dict file")
    if out.exists():
        raise KitelmError(f"{out} already exists; choose a new --out folder")
    tok = find_tokenizer(src, tokenizer)
    if tok is None:
        raise KitelmError(f"no tokenizer.model beside {src}; pass the SentencePiece file with --tokenizer PATH")
    model = load_model(src, **config_overrides)
    if tok.vocab_size > model.config.vocab_size:
        raise KitelmError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}; "
                          "pass the tokenizer that belongs to this checkpoint")

    def fill(tmp: Path) -> None:
        write_model(tmp, model.state_dict(), model.config, tok, converted_from=str(src))
        for folder in {src if src.is_dir() else src.parent, Path(tokenizer).parent if tokenizer else None} - {None}:
            for name in CHAT_TEMPLATE_FILES:  # the chat template `kitelm serve` and `kitelm chat` render
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, tmp / name)

    try:
        write_folder(out, fill)
    except OSError as err:
        raise CheckpointError(f"could not write {out} ({err.strerror or err})") from None
    return out


def load_foreign(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 tokenizer: str | Path | None = None):
    """(model, SentencePiece tokenizer) from an HF folder or an official state-dict file (for `kitelm.load`)."""
    path = Path(path)
    model = load_model(path, device=device, dtype=dtype)
    tok = find_tokenizer(path, tokenizer)
    if tok is None:
        raise CheckpointError(f"no tokenizer.model beside {path}; put the SentencePiece file there or run "
                              "`kitelm convert SRC --out DIR --tokenizer PATH` first")
    return model, tok
