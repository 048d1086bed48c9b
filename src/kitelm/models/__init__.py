"""Model families. `ARCHITECTURES` maps `ModelConfig.arch` to its class; `build_model` instantiates one."""

from __future__ import annotations

import torch

from .base import LanguageModel
from .griffin import Griffin
from .simplified import SimplifiedTransformer
from .transformer import Transformer

ARCHITECTURES: dict[str, type[LanguageModel]] = {
    "transformer": Transformer,
    "griffin": Griffin,
    "simplified": SimplifiedTransformer,
}


def build_model(config, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LanguageModel:
    """Instantiate the model described by `config` (a `kitelm.config.ModelConfig`), initialised, on `device`."""
    with torch.device(device or "cpu"):
        model = ARCHITECTURES[config.arch](config)
    return model.to(dtype) if dtype is not None else model
