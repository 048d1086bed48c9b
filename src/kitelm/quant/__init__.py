"""Quantized weights: bf16 / int8 / int4 storage for every architecture's Linear layers (and, optionally, the tied
embedding), the modules that run them (`QuantizedLinear`, `QuantizedEmbedding`), streaming conversion
(`kitelm quantize`) and memory-mapped loading. Formats and kernels: `kitelm.ops.quant`."""

from .checkpoint import QUANT_KEY, is_quantized, load_quantized, quantize_checkpoint
from .modules import QuantizedEmbedding, QuantizedLinear, QuantSpec, quantize_model

__all__ = ["QUANT_KEY", "QuantSpec", "QuantizedEmbedding", "QuantizedLinear", "is_quantized", "load_quantized",
           "quantize_checkpoint", "quantize_model"]
