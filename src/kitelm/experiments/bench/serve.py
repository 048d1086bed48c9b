"""`kitelm bench serve`: the OpenAI-compatible server under N concurrent streaming multi-turn chat clients.

Each (model, N) point starts a fresh `kitelm serve` process on a loopback port (so its peak RSS is its own) and runs
N asyncio clients in this process, each holding a `serve_turns`-turn conversation: a `serve_user_chars`-byte user
message, a `serve_reply_tokens`-token streamed reply (greedy, `ignore_eos`), the reply appended to the history.
Measured: aggregate generated tokens/s over the point's wall time, time to first token (TTFT, request sent → first
content chunk), inter-token latency (gaps between content chunks), the server's peak RSS (VmHWM).

The long-conversation part holds one conversation of `serve_long_turns` turns with `serve_long_user_chars`-byte
messages, with the kept state on and off (`--state-cache-mib 0`): TTFT of each turn and the server's RSS after it.

Models are random-weight presets with an untied output head whose rows for non-ASCII bytes and EOS are zero, so a
reply re-encodes to the same tokens in the next turn's history (as a trained model's text would) and runs to
max_tokens. Clients and server share the machine's cores: the numbers are for both together.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ...data.tokenizer import ByteTokenizer
from ...models import build_model
from ...presets import get_preset
from .report import model_lines

NOTE = ("N concurrent streaming chat clients (asyncio, this process) against `kitelm serve` (a fresh process per "
        "point, loopback): each holds a multi-turn conversation, greedy replies of a fixed length. tok/s = all "
        "generated tokens / wall time; TTFT and inter-token latency over every turn; server peak RSS = VmHWM. The "
        "`turn` rows: one long conversation, TTFT of turn k with the kept state on (`kept`) and off.")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def save_bench_model(name: str, folder: Path, max_seq_len: int) -> Path:
    """A random-weight checkpoint of preset `name` whose greedy text is ASCII (see the module docstring)."""
    from ...checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = get_preset(name).replace(tie_embeddings=False, max_seq_len=max_seq_len)
    model = build_model(config).eval()
    with torch.no_grad():
        model.head.weight[128:] = 0
    return save_checkpoint(folder, 1, model.state_dict(), config, ByteTokenizer())


class Server:
    """`kitelm serve CHECKPOINT --port 0 ...` in a subprocess; `url` once it listens and has answered one warm-up
    request (the first one in a process pays one-time costs: kernel loading, allocator growth)."""

    def __init__(self, checkpoint: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "kitelm", "serve", str(checkpoint), "--port", "0",
                                      "--model-name", "bench", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
        if not found:
            self.close()
            raise RuntimeError(f"kitelm serve did not start: {line}{self.proc.stdout.read()[-2000:]}")
        self.url = found.group(0)
        import httpx

        httpx.post(self.url + "/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=600)

    def status(self) -> dict[str, int]:
        return _proc_status(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


async def _turn(client, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat turn → {text, ttft, gaps, tokens, cached}."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times, text, usage = [], [], {}
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    times.append(time.perf_counter())
                    text.append(piece)
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"text": "".join(text), "ttft": (times[0] - sent) if times else float("nan"), "gaps": gaps,
            "tokens": usage.get("completion_tokens", 0),
            "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def _user_message(rng: random.Random, chars: int) -> str:
    words = ["state", "token", "model", "window", "batch", "server", "cache", "turn", "reply", "stream"]
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(words))
    return " ".join(out)[:chars]


async def _conversation(client, seed: int, turns: int, user_chars: int, reply_tokens: int, after_turn=None):
    rng = random.Random(seed)
    messages, results = [], []
    for k in range(turns):
        messages.append({"role": "user", "content": _user_message(rng, user_chars)})
        result = await _turn(client, messages, reply_tokens)
        messages.append({"role": "assistant", "content": result["text"]})
        results.append(result)
        if after_turn is not None:
            after_turn(k, result)
    return results


async def _clients(url: str, n: int, turns: int, user_chars: int, reply_tokens: int) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(_conversation(client, i, turns, user_chars, reply_tokens) for i in range(n)))
        return [r for conv in done for r in conv], time.perf_counter() - start


def run(settings, machine: dict, log) -> list[dict]:
    rows = []
    models, clients, turns = settings.serve_models, settings.serve_clients, settings.serve_turns
    user_chars, reply = settings.serve_user_chars, settings.serve_reply_tokens
    long_turns, long_chars = settings.serve_long_turns, settings.serve_long_user_chars
    context = 8192  # the transformer's context: room for the longest conversation measured
    common = ["--dtype", settings.dtype, "--max-seqs", str(max(clients)), "--max-queue", str(4 * max(clients))]
    with tempfile.TemporaryDirectory(prefix="kitelm-bench-serve-") as tmp:
        for name in models:
            ckpt = save_bench_model(name, Path(tmp) / name, context)
            for n in clients:
                server = Server(ckpt, *common)
                try:
                    results, wall = asyncio.run(_clients(server.url, n, turns, user_chars, reply))
                    status = server.status()
                finally:
                    server.close()
                ttft = [r["ttft"] for r in results]
                gaps = [g for r in results for g in r["gaps"]]
                tokens = sum(r["tokens"] for r in results)
                rows.append({"part": "clients", "model": name, "clients": n, "turns": turns,
                             "tok_per_s": tokens / wall, "ttft_p50_ms": 1e3 * _percentile(ttft, 0.5),
                             "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99),
                             "itl_p50_ms": 1e3 * _percentile(gaps, 0.5), "itl_p99_ms": 1e3 * _percentile(gaps, 0.99),
                             "server_peak_rss_mb": status.get("VmHWM", 0) / 2**20})
                log(f"serve {name} {n} clients: {rows[-1]['tok_per_s']:.0f} tok/s, TTFT p50 "
                    f"{rows[-1]['ttft_p50_ms']:.0f} ms, peak RSS {rows[-1]['server_peak_rss_mb']:.0f} MB")
            for kept in (True, False):
                server = Server(ckpt, *common, *([] if kept else ["--state-cache-mib", "0"]))
                per_turn = []

                def after_turn(k, result, server=server, per_turn=per_turn):
                    per_turn.append((k + 1, result, server.status().get("VmRSS", 0)))

                async def one():
                    import httpx

                    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
                        await _conversation(client, 7, long_turns, long_chars, 16, after_turn)

                try:
                    asyncio.run(one())
                finally:
                    server.close()
                for k, result, rss in per_turn:
                    rows.append({"part": "turn", "model": name, "kept": kept, "turn": k,
                                 "ttft_ms": 1e3 * result["ttft"], "cached_tokens": result["cached"],
                                 "server_rss_mb": rss / 2**20})
                first, last = per_turn[0][1]["ttft"], per_turn[-1][1]["ttft"]
                log(f"serve {name} kept={kept}: TTFT turn 1 {first * 1e3:.0f} ms, turn {long_turns} "
                    f"{last * 1e3:.0f} ms")
    return rows


def plot(rows: list[dict], settings, out: Path) -> None:
    clients = [r for r in rows if r["part"] == "clients"]
    if clients:
        model_lines(clients, "clients", "tok_per_s", out / "serve_tokens_per_s.png",
                    "kitelm serve: aggregate tokens/s vs concurrent clients", "tokens/s")
    turns = [dict(r, model=f"{r['model']} ({'kept' if r['kept'] else 'cold'})") for r in rows if r["part"] == "turn"]
    if turns:
        model_lines(turns, "turn", "ttft_ms", out / "serve_ttft_by_turn.png",
                    "kitelm serve: time to first token of turn k", "TTFT (ms)")
