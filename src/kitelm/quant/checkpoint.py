"""Quantized checkpoints: `quantize_checkpoint` (streaming conversion, `kitelm quantize`) and `load_quantized`
(memory-mapped loading, used by `kitelm.load`).

A quantized checkpoint is a kitelm checkpoint folder whose `config.json` carries one more key, `"quantization":
{"weights": "int8", "group_size": 32, "embedding": true}`, and whose `model.safetensors` holds `{module}.qweight` /
`{module}.scales` in place of every quantized `{module}.weight` (quant/modules.py).

Conversion reads the source one tensor at a time (safetensors `safe_open`, or `torch.load(weights_only=True, mmap=True)` for an official
state dict) and keeps only the output: peak memory ≈ the output's size + the largest source tensor in fp32, checked
against the machine's available memory before anything is read. The output is written into a hidden temporary folder
and renamed into place: a failure leaves nothing, and an existing folder is never touched.

Loading maps the safetensors file into memory (`torch.UntypedStorage.from_file`, copy-on-write): no fp32 copy of the
model is ever made, and pages are read from disk as the kernels touch them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..checkpoint import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, resolve_checkpoint, verify_checkpoint, write_folder
from ..config import ModelConfig
from ..errors import CheckpointError, KitelmError
from ..models import build_model
from ..resources import available_memory
from .modules import QuantSpec, quantize_model, quantized_names

QUANT_KEY = "quantization"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


# ------------------------------------------------------------------------------------------------------ reading
def read_config(folder: Path) -> tuple[ModelConfig, QuantSpec | None]:
    try:
        data = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder / CONFIG_FILE} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} must hold a JSON object")
    spec = QuantSpec.from_dict(data.pop(QUANT_KEY)) if QUANT_KEY in data else None
    return ModelConfig.from_dict(data), spec


def is_quantized(folder: str | Path) -> bool:
    """True for a checkpoint folder whose config.json records a weight format."""
    try:
        data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and QUANT_KEY in data


def read_safetensors_mmap(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a view into one copy-on-write memory map of it. The header and every
    tensor's extent are checked against the file's size first: a truncated or corrupt file raises CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is None or 8 + n > size:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file "
                                      f"of {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} has a corrupt header ({err})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    whole = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}") from None
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if e - b != count * itemsize or b < 0 or start + e > size:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {name!r} needs bytes {start + b}-"
                                  f"{start + e} of a {size}-byte file")
        raw = whole[start + b:start + e]
        if (start + b) % itemsize:  # unaligned (safetensors packs by dtype size, so only odd layouts get here)
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   verify: bool = True) -> tuple[torch.nn.Module, ModelConfig]:
    """The model of a quantized checkpoint folder (verified against its manifest unless the caller did), its
    tensors memory-mapped."""
    folder = resolve_checkpoint(path)
    if verify and (folder / MANIFEST_FILE).exists():
        verify_checkpoint(folder)
    config, spec = read_config(folder)
    if spec is None:
        raise CheckpointError(f"{folder} is not a quantized checkpoint (no {QUANT_KEY!r} in {CONFIG_FILE})")
    model = quantize_model(build_model(config, device="meta"), spec)
    state = read_safetensors_mmap(folder / MODEL_FILE)
    _check_state(model, state, str(folder / MODEL_FILE))
    model.load_state_dict(state, assign=True)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]  # non-persistent buffers: real ones from a
    if leftover:                                                   # small full-precision build of the same config
        fresh = dict(build_model(config, device="cpu").named_buffers())
        for name in leftover:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh[name])
    model = model.to(device).eval()
    return model, config


def _check_state(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: {state[k].dtype} {tuple(state[k].shape)} vs {v.dtype} {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype))
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"mis-shaped or mis-typed {wrong[:5]}" if wrong else ""]
        raise CheckpointError(f"{source} does not fit the quantized model in config.json: "
                              + "; ".join(p for p in parts if p))
    for key, t in state.items():
        if key.endswith(".scales") and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise CheckpointError(f"{source}: the scales of {key[:-7]} are corrupt (zero, negative or not finite)")


# ------------------------------------------------------------------------------------------------- conversion
class _Source:
    """A checkpoint read one tensor at a time: `config`, `names()` → kitelm names with shapes, `tensors()`."""

    def __init__(self, path: Path, tokenizer: str | Path | None):
        from ..convert import detect

        self.path = path
        self.kind = detect(path)
        if self.kind is None:
            folder = resolve_checkpoint(path)
            if (folder / MANIFEST_FILE).exists():
                verify_checkpoint(folder)
            self.config, spec = read_config(folder)
            if spec is not None:
                raise KitelmError(f"{folder} is already quantized ({spec.weights}, group size {spec.group_size}); "
                                  "quantize the full-precision checkpoint it came from instead")
            self.folder = folder
            self.files = [folder / MODEL_FILE]
            from ..data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(folder)
        else:
            from ..convert.recurrentgemma import HF_INDEX, config_from_gdm_state, config_from_hf, find_tokenizer

            self.tokenizer = find_tokenizer(path, tokenizer)
            if self.tokenizer is None:
                raise KitelmError(f"no tokenizer.model beside {path}; pass the SentencePiece file with --tokenizer")
            if self.kind == "hf":
                try:
                    data = json.loads((path / "config.json").read_text())
                except (OSError, json.JSONDecodeError) as err:
                    raise CheckpointError(f"{path / 'config.json'} is unreadable ({err})") from None
                if QUANT_KEY in data or data.get("quantization_config"):
                    raise KitelmError(f"{path} is already quantized; quantize a full-precision checkpoint")
                self.config = config_from_hf(data, name=path.name or "recurrentgemma")
                index = path / HF_INDEX
                if index.exists():
                    try:
                        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    except (json.JSONDecodeError, KeyError, AttributeError) as err:
                        raise CheckpointError(f"{index} is corrupt ({err})") from None
                    self.files = [path / n for n in names]
                else:
                    self.files = [path / "model.safetensors"]
            else:
                try:
                    self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as err:  # torch raises many kinds of errors on non-checkpoint files
                    raise CheckpointError(f"{path} is not a PyTorch state dict ({err.__class__.__name__}: "
                                          f"{err})") from None
                if not isinstance(self.state, dict) or not all(isinstance(v, Tensor) for v in self.state.values()):
                    raise CheckpointError(f"{path} does not hold a state dict of tensors")
                self.config = config_from_gdm_state(self.state, name=path.stem)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(kitelm name, tensor) pairs, one source tensor in memory at a time."""
        from ..convert.recurrentgemma import gdm_to_kitelm, hf_to_kitelm

        if self.kind == "gdm":
            for key in list(self.state):
                yield from gdm_to_kitelm({key: self.state[key]}).items()
            return
        from safetensors import SafetensorError, safe_open

        rename = hf_to_kitelm if self.kind == "hf" else (lambda d: d)
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        yield from rename({key: f.get_tensor(key)}).items()
            except FileNotFoundError:
                raise CheckpointError(f"{file} is missing") from None
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file} is corrupt or truncated ({err})") from None


def conversion_bytes(config: ModelConfig, spec: QuantSpec) -> tuple[int, int]:
    """(output bytes, largest tensor in fp32 bytes) of quantizing a model of `config` into `spec`."""
    skeleton = build_model(config, device="meta")
    targets = quantized_names(skeleton, spec)
    out = largest = 0
    for name, t in skeleton.state_dict().items():
        largest = max(largest, 4 * t.numel())
        if name in targets:
            rows, width = targets[name]
            out += int(rows * width * spec.bits(width) / 8)
        else:
            out += 4 * t.numel()
    return out, largest


def quantize_checkpoint(src: str | Path, out: str | Path, spec: QuantSpec, tokenizer: str | Path | None = None,
                        memory_limit: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Write `src` (a kitelm checkpoint or run folder, a RecurrentGemma HF folder or official state-dict file) with
    its weights stored as `spec`, into the new folder `out`. Everything that can be refused is refused before a tensor
    is read: an existing `out`, an already-quantized source, a group size that does not divide a layer's width,
    more memory than the machine has available (`memory_limit` overrides MemAvailable)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise KitelmError(f"{out} already exists; choose a new --out folder (existing checkpoints are never touched)")
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    source = _Source(src, tokenizer)
    config = source.config
    model = quantize_model(build_model(config, device="meta"), spec)  # checks every layer's group size
    expected = model.state_dict()
    targets = quantized_names(build_model(config, device="meta"), spec)
    need_out, largest = conversion_bytes(config, spec)
    available = memory_limit if memory_limit is not None else available_memory()
    need = need_out + 2 * largest  # the output, one source tensor in fp32, and its quantized copy in flight
    if available is not None and need > available:
        raise KitelmError(f"quantizing {src} to {spec.weights} needs about {need / 2**30:.1f} GiB of memory "
                          f"({need_out / 2**30:.1f} GiB output + {2 * largest / 2**30:.1f} GiB for the largest "
                          f"tensor in flight) but {available / 2**30:.1f} GiB is available; free memory or choose a "
                          "smaller format")
    say = log or (lambda _: None)
    group = "" if spec.weights == "bf16" else f"group {spec.group_size or 'per channel'}, "
    say(f"quantizing {src} ({config.name}) to {spec.weights} ({group}embedding "
        f"{'quantized' if spec.embedding else 'kept in fp32'}): about {need_out / 2**30:.2f} GiB out")
    from ..ops.quant import quantize

    state: dict[str, Tensor] = {}
    for name, tensor in source.tensors():
        if name in targets:
            module = name[: -len(".weight")]
            width = targets[name][1]
            storage, scales = quantize(tensor, spec.weights, spec.group_for(width))
            state[f"{module}.qweight"] = storage
            if scales is not None:
                state[f"{module}.scales"] = scales
        elif name in expected:
            state[name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
        else:
            state[name] = tensor  # reported as unexpected below
        del tensor
    _check_state(model, state, str(src))
    return _write(out, state, config, spec, source, say)


def _write(out: Path, state: dict[str, Tensor], config: ModelConfig, spec: QuantSpec, source: _Source,
           say: Callable[[str], None]) -> Path:
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / MODEL_FILE,
                  metadata={"format": "pt", "kitelm_arch": config.arch, "kitelm_weights": spec.weights,
                            "converted_from": str(source.path)})
        (tmp / CONFIG_FILE).write_text(json.dumps({**config.to_dict(), QUANT_KEY: spec.to_dict()}, indent=2) + "\n")
        source.tokenizer.save(tmp)

    try:
        write_folder(out, fill)
    except OSError as err:
        raise CheckpointError(f"could not write {out} ({err.strerror or err}); nothing was left behind") from None
    say(f"wrote {out} ({(out / MODEL_FILE).stat().st_size / 2**30:.2f} GiB)")
    return out
