"""Parameter counts of every preset (built on the meta device: no memory, no time)."""

from __future__ import annotations

from ..config import list_presets
from ..models import build_model


def preset_rows() -> list[dict]:
    rows = []
    for config in list_presets():
        model = build_model(config, device="meta")
        rows.append({"model": config.name, "arch": config.arch, "params": model.num_params(),
                     "non_embedding_params": model.num_params(non_embedding=True)})
    return rows


def run(log) -> list[dict]:
    rows = preset_rows()
    log(f"params: {len(rows)} presets")
    return rows
