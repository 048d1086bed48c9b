"""The peers kitelm is measured against, built at the same configuration: transformers' `LlamaForCausalLM` (for the
transformer baseline) and `RecurrentGemmaForCausalLM` (for Griffin / Hawk). Optional: absent packages are skipped."""

from __future__ import annotations

import time

import torch

from ...models.griffin import BLOCK_KINDS

HF_ACT = {"geglu": "gelu_pytorch_tanh", "swiglu": "silu"}


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def peer_name(config) -> str | None:
    """The name of `config`'s peer, or None when there is none (or transformers is not installed)."""
    if not transformers_available():
        return None
    if config.arch == "transformer" and config.mlp in HF_ACT:
        return "transformers Llama"
    return "transformers RecurrentGemma" if config.arch == "griffin" else None


def peer_for(config) -> tuple[str, torch.nn.Module] | None:
    """(name, randomly initialised HF model with the same sizes as `config`, in torch's default dtype), or None when
    there is no peer."""
    name = peer_name(config)
    if name == "transformers Llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.width,
                         intermediate_size=config.mlp_width, num_hidden_layers=config.n_layers,
                         num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
                         head_dim=config.dim_per_head, hidden_act=HF_ACT[config.mlp], rms_norm_eps=config.norm_eps,
                         max_position_embeddings=1 << 17, rope_theta=config.rope_base,
                         tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False)
        return name, LlamaForCausalLM(hf).eval()
    if name == "transformers RecurrentGemma":
        from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

        hf = RecurrentGemmaConfig(num_hidden_layers=config.n_layers, vocab_size=config.vocab_size,
                                  hidden_size=config.width, intermediate_size=2 * config.mlp_width,
                                  num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
                                  lru_width=config.recurrent_width,
                                  attention_window_size=config.attention_window, conv1d_width=config.conv_width,
                                  logits_soft_cap=config.logit_softcap or 1e9,  # HF always caps; 1e9 ≈ none
                                  rms_norm_eps=config.norm_eps,
                                  partial_rotary_factor=config.rope_fraction, rope_theta=config.rope_base,
                                  block_types=[BLOCK_KINDS[c] for c in config.block_pattern])
        return name, RecurrentGemmaForCausalLM(hf).eval()
    return None


class _TimingStreamer:
    """HF `generate` streamer that records the arrival time of every generated token (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


@torch.no_grad()
def hf_token_arrivals(model, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """Greedy `generate` of `n` tokens after `prompt` (batch 1): (start time, arrival time of every token)."""
    streamer = _TimingStreamer()
    start = time.perf_counter()
    model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                   pad_token_id=0)
    return start, streamer.times
