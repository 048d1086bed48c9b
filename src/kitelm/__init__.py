"""kitelm: efficient language models in PyTorch — a transformer baseline, simplified transformer blocks and
Griffin / Hawk / RecurrentGemma, with training, generation and benchmarks on CPU and GPU."""

__version__ = "0.1.0"

__all__ = ["LM", "load", "__version__"]


def __getattr__(name: str):
    """`kitelm.load` and `kitelm.LM` import torch on first use, so `import kitelm.cli` (and `kitelm --help`) stays
    fast."""
    if name in ("LM", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'kitelm' has no attribute {name!r}")
