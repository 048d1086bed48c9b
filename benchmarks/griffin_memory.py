"""Griffin's bounded inference state, measured (issue 3): peak memory of prefilling 8k and 32k tokens, and the state's
bytes after 1k, 8k and 64k tokens.

    python benchmarks/griffin_memory.py [--model griffin-small] [--out benchmarks/results/griffin_memory.json]

Peak memory is the growth of the process's max RSS during one no-grad prefill, each length in a fresh process (so
earlier runs do not hide later peaks). For the state size, the first 1k tokens are decoded one at a time; the
remaining tokens up to 8k and 64k are fed as 4k-token chunks continuing the same state (decoding 64k tokens one by one
takes ~15 minutes on 2 shared CPU cores), then 8 more tokens are decoded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

from kitelm.config import get_preset
from kitelm.models import build_model


def _prefill_peak(model_name: str, length: int, queue) -> None:
    torch.manual_seed(0)
    model = build_model(get_preset(model_name)).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, length))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        cache = model.new_cache(1)
        model(tokens, torch.arange(length)[None], cache)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"tokens": length, "peak_rss_growth_mib": (after - before) / 1024, "seconds": seconds,
               "state_bytes": cache.nbytes()})


def prefill_peaks(model_name: str, lengths: list[int]) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = []
    for length in lengths:
        queue = ctx.Queue()
        proc = ctx.Process(target=_prefill_peak, args=(model_name, length, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    return results


def state_bytes(model_name: str, checkpoints: list[int], chunk: int = 4096) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(get_preset(model_name)).eval()
    vocab = model.config.vocab_size
    cache = model.new_cache(1)
    seen, out = 0, []
    with torch.no_grad():
        model(torch.randint(0, vocab, (1, 1)), torch.zeros(1, 1, dtype=torch.long), cache)
        seen = 1
        for target in checkpoints:
            while seen < min(target, 1024):
                model(torch.randint(0, vocab, (1, 1)), cache=cache)
                seen += 1
            while seen < target:
                n = min(chunk, target - seen)
                model(torch.randint(0, vocab, (1, n)), cache=cache)
                seen += n
            for _ in range(8):
                model(torch.randint(0, vocab, (1, 1)), cache=cache)
            out.append({"tokens": target + 8, "state_bytes": cache.nbytes()})
            seen += 8
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="griffin-small")
    parser.add_argument("--out", default="benchmarks/results/griffin_memory.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"model": args.model, "torch": torch.__version__, "threads": 1,
              "prefill": prefill_peaks(args.model, [8192, 32768]),
              "state": state_bytes(args.model, [1024, 8192, 65536])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
