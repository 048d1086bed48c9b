"""The official reference, `recurrentgemma==1.0.1`'s torch modules, imported without JAX.

The package's top-level `__init__` imports its JAX code (recurrentgemma/__init__.py:19-22); registering an empty
package module whose `__path__` is the installed folder lets `recurrentgemma.torch.*` import on torch alone.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

if "recurrentgemma" not in sys.modules:
    _spec = importlib.util.find_spec("recurrentgemma")
    _pkg = types.ModuleType("recurrentgemma")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    sys.modules["recurrentgemma"] = _pkg

from recurrentgemma import common  # noqa: E402
from recurrentgemma.torch import griffin, layers, modules  # noqa: E402

from kitelm.convert.recurrentgemma import config_from_gdm_state, gdm_to_kitelm, load_state_strict  # noqa: E402
from kitelm.models import build_model  # noqa: E402

__all__ = ["common", "griffin", "layers", "modules", "reference_griffin", "kitelm_twin", "randomize_", "one_thread"]


def one_thread():
    """Generator for a module-scoped fixture: tiny models on a shared 2-core machine run ~50× faster on one thread
    (no OpenMP spinning against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-zero norm scales and biases (random init leaves them at 0 and would hide bugs in those paths)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last in ("scale", "b", "bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def reference_griffin(width=48, heads=4, lru_width=64, mlp=96, pattern="RRARR", window=4, vocab=97, seed=0,
                      scale=True, softcap=30.0):
    """A random tiny GDM `Griffin` (fp32, no gradient checkpointing) with non-zero scales and biases."""
    torch.manual_seed(seed)
    kinds = {"R": common.TemporalBlockType.RECURRENT, "A": common.TemporalBlockType.ATTENTION}
    cfg = common.GriffinConfig(vocab_size=vocab, width=width, mlp_expanded_width=mlp, num_heads=heads,
                               block_types=tuple(kinds[c] for c in pattern), embeddings_scale_by_sqrt_dim=scale,
                               attention_window_size=window, logits_soft_cap=softcap, lru_width=lru_width)
    ref = griffin.Griffin(cfg, gradient_checkpointing=False)
    randomize_(ref, torch.Generator().manual_seed(seed + 1))
    return ref.eval()


def kitelm_twin(ref) -> torch.nn.Module:
    """The kitelm model with the reference's weights, through the converter's official-state-dict path."""
    cfg = ref.config
    state = {k: v.clone() for k, v in ref.state_dict().items()}  # the loader assigns tensors; do not share them
    config = config_from_gdm_state(state, attention_window=cfg.attention_window_size,
                                   embed_scale_sqrt=cfg.embeddings_scale_by_sqrt_dim,
                                   logit_softcap=cfg.logits_soft_cap)
    model = build_model(config, device="meta")
    load_state_strict(model, gdm_to_kitelm(state), "reference")
    return model.eval()
