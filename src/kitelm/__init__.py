"""kitelm: efficient language models in PyTorch — a transformer baseline, simplified transformer blocks and
Griffin / Hawk / RecurrentGemma, with training, generation and benchmarks on CPU and GPU."""

__version__ = "0.1.0"

from .api import LM, load  # noqa: E402

__all__ = ["LM", "load", "__version__"]
