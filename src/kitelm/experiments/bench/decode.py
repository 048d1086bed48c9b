"""Real-size decoding per weight format (`kitelm bench decode --model recurrentgemma-2b --weights int8`): random
weights, nothing downloaded. One fresh process per format (peak RSS only grows within a process) builds the model
block by block (a block in fp32 at a time, then quantized: a 9B model never exists in fp32) and measures

* batch-1 decode ms/token after a 64-token prompt, beside the byte floor: stored weight bytes ÷ the read bandwidth
  measured in the same process (`torch.sum` over 1 GiB, far beyond the 480 MiB L3 of the Sapphire-Rapids VM) just
  before each round of steps (`_batch1_rounds`);
* prefill tokens/s per prompt length with last-token-only logits, beside the GEMM bound (the FLOPs that pass must
  do, `prefill_flops`, ÷ the measured peak of the dtype the tiled path uses: bf16 where native, else fp32);
* batched decode tokens/s at each batch size; peak RSS;
* with `settings.peers`, transformers' model at the same configuration (random weights; fp32, and bf16 where the
  CPU has native bf16): its batch-1 `generate` ms/token after the same prompt, beside its own byte floor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

from ...models import build_model
from ...presets import get_preset
from ...quant import QuantSpec, QuantizedEmbedding, quantize_model
from ..machine import ALLOCATOR_ENV, peak_rss_bytes

NOTE = ("Random-weight model per format in its own process (fp32 = the unquantized model; bf16/int8/int4 = "
        "`kitelm quantize` storage: Linear layers and the tied embedding, RG-LRU and norms fp32). ms/token: batch-1 "
        "greedy decode after a 64-token prompt, fastest of the timed steps (median beside it). Floor: stored weight "
        "bytes ÷ the read bandwidth measured in the same process just before each of 4 rounds of steps; of_floor is "
        "the median over the rounds of that round's floor ÷ its fastest step, read_GBps and floor_ms the median "
        "round's. Prefill: tokens/s of one pass into the cache with last-token-only logits (as `generate` "
        "prefills); of_bound = the FLOPs that pass must do ÷ the measured 2048³ GEMM peak of the compute dtype ÷ its "
        "time, where the FLOPs are 2 per weight per prompt token for all but the output matrix (incl. the RG-LRU "
        "gates, which run in fp32), 2·vocab·width once for the last token's logits, and the local attention's "
        "scores and sums (prefill512_GFLOP_per_token). Batched: decode tokens/s at B rows. transformers rows: its "
        "model at the same configuration, random weights, batch-1 `generate` after the same prompt (fastest gap "
        "between two tokens).")
WEIGHTS = ("fp32", "bf16", "int8", "int4")
ROUNDS = 4  # batch-1 decoding is timed in this many rounds, each beside its own bandwidth sample


def random_model(preset: str, weights: str, group_size: int = -1, embedding: bool = True, seed: int = 0):
    """A model of `preset` with random weights stored as `weights` ('fp32' = unquantized). Griffin models are built
    one block at a time (peak ≈ the stored model + one fp32 block + the fp32 embedding); others in one piece."""
    torch.manual_seed(seed)
    config = get_preset(preset)
    spec = None if weights == "fp32" else QuantSpec(weights, group_size, embedding)
    if config.arch != "griffin":
        model = build_model(config)
        return (model if spec is None else quantize_model(model, spec)).eval()
    from ...layers.norms import RMSNorm
    from ...models.griffin import ResidualBlock

    model = build_model(config, device="meta")
    for i, kind in enumerate(model.block_kinds(config)):
        block = ResidualBlock(config, kind)
        model.blocks[i] = block if spec is None else quantize_model(block, spec)
    model.norm = RMSNorm(config.width, config.norm_eps, unit_offset=True)
    embed = nn.Embedding(config.vocab_size, config.width)
    nn.init.normal_(embed.weight, std=config.width ** -0.5)
    model.embed = QuantizedEmbedding.from_embedding(embed, spec) if spec is not None and spec.embedding else embed
    del embed
    if model.head is not None:  # untied output matrix
        from ...layers.linear import Linear

        head = Linear(config.width, config.vocab_size, bias=False)
        nn.init.normal_(head.weight, std=config.width ** -0.5)
        model.head = head if spec is None else quantize_model(nn.Sequential(head), spec)[0]
    return model.eval()


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, a tensor shared under two names (transformers' tied
    `lm_head.weight` and `embed_tokens.weight`) counted once: what a batch-1 step reads (the tied head reads the whole
    embedding matrix; the embedding lookup's one row is noise)."""
    unique = {(t.data_ptr(), t.dtype, t.shape): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def _prefilled(model, batch: int, prompt: int, steps: int) -> tuple:
    """(cache, next token ids [batch, 1]) after a random `prompt`-token prefill, room for `steps` more tokens."""
    cache = model.new_cache(batch, max_len=prompt + steps + 2)
    logits = model(torch.randint(0, model.config.vocab_size, (batch, prompt)), cache=cache)
    return cache, logits[:, -1].argmax(-1, keepdim=True)


def _timed_steps(model, cache, nxt, steps: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `steps` greedy decoding steps continuing `cache`, and the next token ids."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(nxt, cache=cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    return times, nxt


def _decode_times(model, batch: int, prompt: int, steps: int) -> list[float]:
    cache, nxt = _prefilled(model, batch, prompt, steps)
    return _timed_steps(model, cache, nxt, steps)[0][1:]  # the first step after prefill pays page faults


def _batch1_rounds(model, nbytes: int, steps: int, rounds: int = ROUNDS) -> dict:
    """Batch-1 decoding after a 64-token prompt in `rounds` rounds of `steps` steps on one cache, each round timed
    right after its own read-bandwidth sample: the VMs' bandwidth drifts by up to 2× within minutes (NOTES.md), so
    a floor means something only beside steps timed at the same moment. of_floor is the median over the rounds of
    (bytes ÷ that round's bandwidth) ÷ that round's fastest step; read_GBps and floor_ms are the median round's."""
    cache, nxt = _prefilled(model, 1, 64, rounds * steps + 1)
    _, nxt = _timed_steps(model, cache, nxt, 1)  # page faults of fresh buffers
    samples, ratios, times = [], [], []
    for _ in range(rounds):
        bandwidth = max(read_bandwidth(repeats=3), 1.0)
        round_times, nxt = _timed_steps(model, cache, nxt, steps)
        samples.append(bandwidth)
        ratios.append(nbytes / bandwidth / min(round_times))
        times += round_times
    bw = sorted(samples)[len(samples) // 2]
    best, median = min(times), sorted(times)[len(times) // 2]
    return dict(read_GBps=round(bw / 1e9, 1), ms_per_token=round(1e3 * best, 1),
                ms_per_token_median=round(1e3 * median, 1), floor_ms=round(1e3 * nbytes / bw, 1),
                of_floor=round(sorted(ratios)[len(ratios) // 2], 2), tok_per_s=round(1 / best, 2))


def measure(preset: str, weights: str, group_size: int, embedding: bool, prompt_lens: list[int],
            batches: list[int], steps: int) -> dict:
    """Everything for one format, in this process (call it in a fresh one for a meaningful peak RSS)."""
    from ...precision import native_bf16

    start = time.perf_counter()
    model = random_model(preset, weights, group_size, embedding)
    built = time.perf_counter() - start
    nbytes = stored_bytes(model)
    row: dict = {"model": preset, "weights": weights, "build_s": round(built, 1), "stored_GB": round(nbytes / 1e9, 3)}
    with torch.inference_mode():
        row.update(_batch1_rounds(model, nbytes, steps))
        config = model.config
        dtype = torch.bfloat16 if weights != "fp32" and native_bf16() else torch.float32
        from ..machine import gemm_peak_flops

        peak = gemm_peak_flops(2048, dtype, repeats=5, warmup=1)
        row["gemm_peak_GFLOPs"] = round(peak / 1e9)
        row["prefill_dtype"] = str(dtype).removeprefix("torch.")
        for length in prompt_lens:
            cache = model.new_cache(1, max_len=length + 1)
            ids = torch.randint(0, config.vocab_size, (1, length))
            t0 = time.perf_counter()
            model(ids, cache=cache, logits_to_keep=1)  # as `generate.prefill`: the head runs on the last token only
            dt = time.perf_counter() - t0
            row[f"prefill{length}_tok_s"] = round(length / dt, 1)
            row[f"prefill{length}_of_bound"] = round(prefill_flops(config, length) / peak / dt, 2)
        row["prefill512_GFLOP_per_token"] = round(prefill_flops(config, 512) / 512 / 1e9, 2)
        for b in batches:
            t = _decode_times(model, b, 8, max(3, steps // 2))
            row[f"batch{b}_tok_s"] = round(b / min(t), 1)
    row["peak_rss_GB"] = round(peak_rss_bytes() / 1e9, 2)
    return row


def build_peer(preset: str, dtype: str, seed: int = 0) -> tuple[str, nn.Module]:
    """(name, transformers' model at `preset`'s configuration with random weights), built directly in `dtype`
    ('fp32' | 'bf16': no fp32 copy of a bf16 model ever exists)."""
    from .peers import peer_for

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dtype == "bf16" else torch.float32)
    try:
        return peer_for(get_preset(preset))
    finally:
        torch.set_default_dtype(previous)


def measure_peer(preset: str, dtype: str, steps: int) -> dict:
    """transformers' model at `preset`'s configuration with random weights in `dtype` ('fp32' | 'bf16'), in this
    process: batch-1 greedy `generate` after a 64-token prompt, ms/token = fastest gap between two tokens' arrivals
    (median beside it), and the byte floor of its weights."""
    from .peers import hf_token_arrivals

    start = time.perf_counter()
    name, model = build_peer(preset, dtype)
    built = time.perf_counter() - start
    nbytes = stored_bytes(model)
    prompt = torch.randint(0, model.config.vocab_size, (64,)).tolist()
    with torch.inference_mode():
        bw = max(read_bandwidth(), 1.0)
        _, arrivals = hf_token_arrivals(model, prompt, steps + 1)
        bw = max(bw, read_bandwidth())
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    best, median, floor = gaps[0], gaps[len(gaps) // 2], nbytes / bw
    return {"model": preset, "weights": f"{name} {dtype}", "build_s": round(built, 1),
            "stored_GB": round(nbytes / 1e9, 3), "read_GBps": round(bw / 1e9, 1), "ms_per_token": round(1e3 * best, 1),
            "ms_per_token_median": round(1e3 * median, 1), "floor_ms": round(1e3 * floor, 1),
            "of_floor": round(floor / best, 2), "tok_per_s": round(1 / best, 2),
            "peak_rss_GB": round(peak_rss_bytes() / 1e9, 2)}


def prefill_flops(config, length: int) -> float:
    """The FLOPs a prefill of `length` tokens must do with last-token-only logits: 2 per weight per token for every
    weight but the output matrix (the blocks' matrices incl. the fp32 RG-LRU gates; biases and norm gains too), the
    output head once (2·vocab·width), and attention's scores and weighted sums (2 matmuls · 2 FLOPs · heads · head_dim
    per key) over the min(t + 1, window) keys of each query in each local-attention layer (every layer attends to
    all t + 1 earlier tokens in the other architectures). The embedding lookup is no FLOP."""
    head = config.vocab_size * config.width
    body = _param_count(config) - head * (1 if config.tie_embeddings else 2)
    if config.arch == "griffin":
        from ...models.griffin import Griffin

        layers = sum(kind == "attention" for kind in Griffin.block_kinds(config))
        keys = sum(min(t + 1, config.attention_window) for t in range(length))
    else:
        layers, keys = config.n_layers, length * (length + 1) // 2
    return 2 * body * length + 2 * head + 4 * config.n_heads * config.dim_per_head * keys * layers


def _param_count(config) -> int:
    return sum(t.numel() for t in build_model(config, device="meta").state_dict().values())


def _child(code: str, preset: str, weights: str) -> dict:
    """The row that `code` prints (as `RESULT <json>`) in a fresh Python with the allocator settings."""
    env = {**os.environ, **ALLOCATOR_ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": preset, "weights": weights, "error": tail[:300]}


def peer_dtypes() -> list[str]:
    """The dtypes transformers' model is measured in: fp32, and bf16 where the CPU has native bf16."""
    from ...precision import native_bf16

    return ["fp32", "bf16"] if native_bf16() else ["fp32"]


def run(settings, machine: dict, log) -> list[dict]:
    from ...resources import available_memory
    from .peers import peer_name

    rows = []
    for preset in settings.decode_models:
        jobs: list[tuple[str, str | None]] = []  # (weights, the call that measures them, or None: skipped)
        for weights in settings.decode_weights:
            args = dict(preset=preset, weights=weights, group_size=settings.decode_group_size,
                        embedding=settings.decode_embedding, prompt_lens=settings.decode_prompt_lens,
                        batches=settings.decode_batches, steps=settings.decode_steps)
            jobs.append((weights, f"from kitelm.experiments.bench.decode import measure; r = measure(**{args!r})"))
        name = peer_name(get_preset(preset)) if settings.peers else None
        for dtype in peer_dtypes() if name else []:
            args = dict(preset=preset, dtype=dtype, steps=settings.decode_steps)
            jobs.append((f"{name} {dtype}",
                         f"from kitelm.experiments.bench.decode import measure_peer; r = measure_peer(**{args!r})"))
        for weights, call in jobs:
            log(f"decode: {preset} {weights} ...")
            need = _peer_bytes(preset, weights)
            available = available_memory()
            if need and available is not None and need > available:
                row = {"model": preset, "weights": weights,
                       "error": f"skipped: needs {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
            else:
                row = _child(f"import json; {call}; print('RESULT ' + json.dumps(r))", preset, weights)
            log("  " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("model", "weights")))
            rows.append(row)
    return rows


def _peer_bytes(preset: str, weights: str) -> int:
    """Bytes of the peer's weights for a peer row (0 for kitelm's own formats, checked by BenchSettings.check)."""
    if not weights.startswith("transformers"):
        return 0
    return (2 if weights.endswith("bf16") else 4) * _param_count(get_preset(preset))
