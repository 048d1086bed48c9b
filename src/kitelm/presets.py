"""Named model configurations. Every architecture module adds its own presets here, next to the baseline's.

The vocabulary size of a preset is the byte-level tokenizer's (257); training with another tokenizer replaces it.
"""

from .config import ModelConfig, register_preset

# --- baseline transformer -------------------------------------------------------------------------------------
register_preset(ModelConfig(name="transformer-tiny", width=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
# The default of `kitelm train`: sized to train in under 10 minutes on 2 CPU cores.
register_preset(ModelConfig(name="transformer-small", width=256, n_layers=6, n_heads=8, n_kv_heads=8, max_seq_len=256))
register_preset(ModelConfig(name="transformer-base", width=768, n_layers=12, n_heads=12, max_seq_len=1024))
register_preset(ModelConfig(name="transformer-1b", width=2048, n_layers=16, n_heads=16, n_kv_heads=4,
                            max_seq_len=2048))

# --- Griffin / Hawk / RecurrentGemma ----------------------------------------------------------------------------

# --- Simplified transformer blocks ------------------------------------------------------------------------------
