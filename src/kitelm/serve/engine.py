"""The continuous-batching engine: one loop, on its own thread, owns the model and every running sequence.

Each step of the loop
1. takes new requests into a bounded waiting queue and drops aborted (disconnected) ones;
2. admits waiting requests while the running sequences fit `max_seqs` and `max_memory`: a Griffin/Hawk sequence
   costs its fixed state size, a transformer sequence the KV cache of `prompt + max_tokens` tokens;
3. prefills up to `prefill_chunk` prompt tokens, oldest admitted prompt first, each prompt into its own single-row
   state, which starts from the longest kept state whose tokens prefix the prompt (`StateCache`);
4. samples the next token of every running sequence (each with its own sampling parameters and torch.Generator),
   streams the new text, retires finished sequences (their state is kept, keyed by their tokens) and decodes the
   rest together in one batched forward.

A long prompt therefore costs the running streams one chunk per step, never its whole prefill, while several short
prompts are prefilled in one step. The batch is a `state.RowBatch`: one cache whose rows [0, n) are the running
sequences; a joining sequence writes one row, a leaving one is replaced by the last row. The engine
knows nothing about HTTP: requests carry a callback that receives `Event`s on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.tokenizer import IncrementalDetokenizer
from ..errors import KitelmError
from ..generate import Sampling, sample_next
from .state import RowBatch, gather, is_bounded, state_nbytes
from .state_cache import StateCache

log = logging.getLogger("kitelm.serve")

KV_HEADROOM = 64  # free KV slots added when the batch's transformer cache fills: one rebuild per 64 steps


class QueueFull(KitelmError):
    """The waiting queue is full: the server answers 429 with Retry-After."""


class ContextTooLong(KitelmError):
    """The prompt plus max_tokens does not fit the model's context or the memory budget (HTTP 400)."""


@dataclass
class GenerationParams:
    """Per-sequence sampling. `stop_ids` end generation on a token (EOS, end of turn); `stop` on text.
    `logprobs`: the chosen token's log-probability plus that many alternatives (None = off).
    `prompt_logprobs`: also score every prompt token (echo + logprobs)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise KitelmError(f"max_tokens={self.max_tokens} must be >= 0")
        self.sampling = Sampling(self.temperature, self.top_k, self.top_p)  # validates the sampling fields


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """`kind` "token": new text (possibly empty while held back) for choice `index`; "done": the choice finished
    (`finish_reason`, counts, and `state` when the request asked for it); "error": the request failed."""

    kind: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    state: object = None
    unabsorbed: int | None = None
    message: str = ""


@dataclass
class Request:
    """`n` sequences sampled from one prompt. With `start_state` the prompt continues that single-row cache (it is
    then only the new tokens) and the kept-state cache is bypassed; `return_state` hands the final state back."""

    prompt_ids: list[int]
    params: GenerationParams
    on_event: Callable[[Event], None]
    n: int = 1
    start_state: object = None
    return_state: bool = False
    aborted: bool = False
    reserved: int = 0
    submitted: float = field(default_factory=time.monotonic)

    def abort(self) -> None:
        """Stop the request (a disconnected client): its sequences leave at the next step, its slot is freed."""
        self.aborted = True


class _Seq:
    def __init__(self, req: Request, index: int, device: torch.device, tokenizer):
        self.req, self.index, self.params = req, index, req.params
        seed = None if req.params.seed is None else req.params.seed + index  # choice i of n: seed + i
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.generated: list[int] = []
        self.logits: torch.Tensor | None = None
        self.argmax: int | None = None  # argmax of `logits`, computed for the whole batch at once
        self.emitted = 0  # characters of the text sent
        self.cached = 0
        self.finish_reason: str | None = None
        self.detokenizer = IncrementalDetokenizer(tokenizer)  # fed the generated ids but the stop ids
        self.start = 0  # `final` and `text` are the text from this character on (see Engine._stream)
        self.final = ""  # what `detokenizer` returned
        self.text = ""  # `final` + the detokenizer's pending text, cut before a stop string
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.offset = 0 if req.start_state is None else int(req.start_state.next_pos[0])  # tokens before the prompt


class _Prefill:
    def __init__(self, req: Request, cache, absorbed: int, cached: int):
        self.req, self.cache, self.absorbed, self.cached = req, cache, absorbed, cached
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if req.params.prompt_logprobs else None


class Engine:
    def __init__(self, model, tokenizer, *, max_seqs: int = 16, max_memory: int | None = None, max_queue: int = 64,
                 state_cache_bytes: int = 256 << 20, prefill_chunk: int = 256, max_context: int | None = None):
        if max_seqs < 1 or max_queue < 0 or prefill_chunk < 1:
            raise KitelmError("max_seqs and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.max_seqs, self.max_memory, self.max_queue, self.prefill_chunk = max_seqs, max_memory, max_queue, \
            prefill_chunk
        self.bounded = is_bounded(model)
        one, two = model.new_cache(1, max_len=1), model.new_cache(1, max_len=2)
        self.seq_bytes = state_nbytes(one)  # a Griffin/Hawk sequence's state, whatever its length
        self.token_bytes = state_nbytes(two) - self.seq_bytes  # transformer: KV bytes per token (0 when bounded)
        self.context = None if self.bounded else (max_context or model.config.max_seq_len)
        if self.max_memory is not None and self.max_memory < self.seq_bytes:
            raise KitelmError(f"max_memory={self.max_memory} bytes is below one sequence's state "
                              f"({self.seq_bytes} bytes)")
        self.state_cache = StateCache(state_cache_bytes)
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._queued = 0  # requests in the inbox or waiting (guarded by _lock)
        self._lock = threading.Lock()
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[_Prefill] = deque()
        self.running: list[_Seq] = []  # row i of self.batch is self.running[i]
        self.batch = RowBatch(model, 0 if self.bounded else KV_HEADROOM)
        self.reserved = 0
        self.generated_tokens = self.prompt_tokens = self.requests_done = 0
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps, for tokens/s
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle and submission
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kitelm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; requests still waiting or running get an error event (nobody waits forever)."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():  # still inside a long step; it exits after it, its requests unanswered
                return
            self._thread = None
        self._take_new(block=False)
        for req in self.waiting:
            self._emit(req, Event("error", message="the server is shutting down"))
        self.waiting.clear()
        self._fail_all("the server is shutting down")

    def reservation(self, prompt_len: int, max_tokens: int) -> int:
        """Bytes one sequence is charged at admission."""
        return self.seq_bytes if self.bounded else self.seq_bytes + self.token_bytes * (prompt_len + max_tokens)

    def check_fits(self, prompt_len: int, max_tokens: int, n: int = 1) -> None:
        """Raise ContextTooLong if the request can never run (context or memory budget)."""
        if self.context is not None and prompt_len + max_tokens > self.context:
            raise ContextTooLong(f"This model's maximum context length is {self.context} tokens. However, you "
                                 f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                                 f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.")
        need = n * self.reservation(prompt_len, max_tokens)
        if self.max_memory is not None and need > self.max_memory:
            raise ContextTooLong(f"the request needs {need} bytes of inference state but the server's memory "
                                 f"budget is {self.max_memory} bytes; reduce the prompt, max_tokens or n")

    def submit(self, req: Request) -> Request:
        if self._stopping:
            raise KitelmError("the engine has stopped")
        if not req.prompt_ids:
            raise KitelmError("the prompt is empty; give at least one token")
        if req.n < 1:
            raise KitelmError(f"n={req.n} must be >= 1")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise KitelmError(f"prompt token ids must be in [0, {vocab})")
        if req.n > self.max_seqs:
            raise KitelmError(f"n={req.n} exceeds the server's max_seqs={self.max_seqs}")
        if req.start_state is not None and req.params.prompt_logprobs:
            raise KitelmError("prompt logprobs cannot continue a given state")
        start = 0 if req.start_state is None else int(req.start_state.next_pos[0])
        self.check_fits(start + len(req.prompt_ids), req.params.max_tokens, req.n)
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull(f"the server is busy: {self._queued} requests are waiting; retry later")
            self._queued += 1
        req.reserved = self.reservation(start + len(req.prompt_ids), req.params.max_tokens)
        self._inbox.put(req)
        return req

    # ------------------------------------------------------------------ metrics
    @property
    def queue_depth(self) -> int:
        return self._queued

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        rate = list(self._rate)
        recent = [(t, n) for t, n in rate if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._take_new(block=not (self.running or self.prefilling or self.waiting))
                    if self._stopping:
                        break
                    self._drop_aborted()
                    self._admit()
                    budget = self.prefill_chunk  # prompt tokens per step, over as many prompts as it covers
                    while self.prefilling and budget > 0:
                        budget -= self._prefill_step(budget)
                    if self.running:
                        self._decode_step()
                except Exception as err:  # a failed step fails its requests, never the server
                    log.exception("engine step failed")
                    self._fail_all(f"internal error during generation: {type(err).__name__}: {err}")

    def _take_new(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self.waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dequeued(self, n: int = 1) -> None:
        with self._lock:
            self._queued -= n

    def _fail_all(self, message: str) -> None:
        reqs = {id(s.req): s.req for s in self.running} | {id(p.req): p.req for p in self.prefilling}
        for req in reqs.values():
            self._emit(req, Event("error", message=message))
        self.running, self.prefilling, self.reserved = [], deque(), 0
        self.batch = RowBatch(self.model, self.batch.headroom)

    def _emit(self, req: Request, event: Event) -> None:
        try:
            req.on_event(event)
        except Exception:  # a consumer's failure must not stop the loop
            log.exception("event callback failed")

    def _drop_aborted(self) -> None:
        for req in [r for r in self.waiting if r.aborted]:
            self.waiting.remove(req)
            self._dequeued()
        for p in [p for p in self.prefilling if p.req.aborted]:
            self.prefilling.remove(p)
            self.reserved -= p.req.reserved * p.req.n
        if any(s.req.aborted for s in self.running):
            self._retire([i for i, s in enumerate(self.running) if s.req.aborted], keep=False)

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            seqs = len(self.running) + sum(p.req.n for p in self.prefilling)
            need = req.reserved * req.n
            if seqs + req.n > self.max_seqs:
                return
            if self.max_memory is not None and self.reserved + need > self.max_memory and seqs:
                return
            self.waiting.popleft()
            self._dequeued()
            self.reserved += need
            self.prefilling.append(self._start_prefill(req))

    def _start_prefill(self, req: Request) -> _Prefill:
        prompt = req.prompt_ids
        if req.start_state is not None:
            return _Prefill(req, gather(self.model, [(req.start_state, [0])], headroom=len(prompt)), 0, 0)
        if not req.params.prompt_logprobs:  # the last prompt token is always run: its logits start generation
            n, kept = self.state_cache.lookup(prompt, len(prompt) - 1)
            if kept is not None:
                return _Prefill(req, gather(self.model, [(kept, [0])], headroom=len(prompt) - n), n, n)
        return _Prefill(req, self.model.new_cache(1, max_len=len(prompt)), 0, 0)

    def _prefill_step(self, budget: int) -> int:
        """Prefill at most `budget` tokens of the oldest admitted prompt; return how many."""
        p = self.prefilling[0]
        prompt, params = p.req.prompt_ids, p.req.params
        chunk = prompt[p.absorbed:p.absorbed + budget]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        # [t, V] when the prompt is scored, else only the chunk's last position [1, V] (the head skips the rest)
        logits = self.model(ids, cache=p.cache, logits_to_keep=0 if p.prompt_logprobs is not None else 1)[0]
        if p.prompt_logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            for j in range(len(chunk)):
                i = p.absorbed + j + 1
                if i < len(prompt):
                    p.prompt_logprobs.append(_token_logprob(lp[j], prompt[i], params.logprobs))
        p.absorbed += len(chunk)
        self.prompt_tokens += len(chunk)
        if p.absorbed < len(prompt):
            return len(chunk)
        self.prefilling.popleft()
        last = logits[-1]
        if p.req.start_state is None:
            self.state_cache.put(prompt, gather(self.model, [(p.cache, [0])]))
        seqs = [_Seq(p.req, i, self.device, self.tokenizer) for i in range(p.req.n)]
        for s in seqs:
            s.logits, s.cached = last, p.cached
        if params.max_tokens == 0:
            for s in seqs:
                s.finish_reason = "length"
                self._emit(p.req, self._done_event(s, p.prompt_logprobs, state=p.cache if p.req.return_state
                                                   else None))
            self.reserved -= p.req.reserved * p.req.n
            self.requests_done += 1
            return len(chunk)
        for s in seqs:
            s.prompt_logprobs = p.prompt_logprobs
        self.batch.add(p.cache, copies=len(seqs))
        self.running.extend(seqs)
        return len(chunk)

    def _decode_step(self) -> None:
        finished = []
        for i, s in enumerate(self.running):
            tok, lp = self._sample(s)
            s.generated.append(tok)
            if tok in s.params.stop_ids:
                s.finish_reason = "stop"
            elif len(s.generated) >= s.params.max_tokens:
                s.finish_reason = "length"
            elif self.context is not None and s.offset + len(s.req.prompt_ids) + len(s.generated) >= self.context:
                s.finish_reason = "length"
            self._stream(s, tok, lp)
            if s.finish_reason is not None:
                finished.append(i)
        self.generated_tokens += len(self.running)
        self._rate.append((time.monotonic(), len(self.running)))
        while len(self._rate) > 4096:
            self._rate.popleft()
        if finished:
            self._retire(finished, keep=True)
        if not self.running:
            return
        ids = torch.tensor([s.generated[-1] for s in self.running], dtype=torch.long, device=self.device)[:, None]
        view = self.batch.view()
        logits = self.model(ids, cache=view)[:, -1]
        self.batch.sync(view)
        best = logits.argmax(-1).tolist()  # one op for every greedy row
        for i, s in enumerate(self.running):
            s.logits, s.argmax = logits[i], best[i]

    def _sample(self, s: _Seq) -> tuple[int, TokenLogprob | None]:
        logits = s.logits
        if s.params.temperature == 0:
            tok = s.argmax if s.argmax is not None else int(logits.argmax())
        else:
            tok = int(sample_next(logits[None], s.params.sampling, s.generator)[0])
        lp = None
        if s.params.logprobs is not None:
            lp = _token_logprob(torch.log_softmax(logits.float(), -1), tok, s.params.logprobs)
        return tok, lp

    def _stream(self, s: _Seq, tok: int, lp: TokenLogprob | None) -> None:
        """Send the new text of `s`; text that may start a stop string, or an incomplete UTF-8 character, waits.

        The text is T = decode(the generated ids but the stop ids) = F + P, F the detokenizer's returned text (which
        never ends in U+FFFD) and P its pending text. Only T's end is kept, `s.text` = T[s.start:], with
        s.start ≤ s.emitted and s.start ≤ max(0, len(F before this token) - M), M = Σ (len(stop) - 1): enough to
        find the first stop string (none lies wholly in the previous F, or an earlier step would have stopped) and
        to hold back a stop string's beginning before any trailing U+FFFD.
        """
        stops = s.params.stop
        searched = s.start + len(s.final)  # len(F) before this token
        if tok not in s.params.stop_ids:
            s.final += s.detokenizer.push([tok])
        text = s.final + s.detokenizer.pending  # T[s.start:]
        hits = [text.find(stop, max(searched - s.start - len(stop) + 1, 0)) for stop in stops if stop]
        if any(h >= 0 for h in hits):
            text = text[:min(h for h in hits if h >= 0)]
            s.finish_reason = "stop"
        safe = len(text)
        if s.finish_reason is None:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for stop in stops:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text.endswith(stop[:k], 0, safe):
                        safe -= k
                        break
        sent = s.emitted - s.start
        delta = text[sent:safe] if safe > sent else ""
        s.emitted = max(s.emitted, s.start + safe)
        start = max(s.start, min(s.emitted, s.start + len(s.final) - sum(max(len(stop) - 1, 0) for stop in stops)))
        s.final, s.text, s.start = s.final[start - s.start:], text[start - s.start:], start
        self._emit(s.req, Event("token", index=s.index, text=delta, token_ids=[tok],
                                logprobs=[lp] if lp is not None else []))

    def _retire(self, rows: list[int], keep: bool) -> None:
        """Remove `rows` from the batch; with `keep`, their states are kept and their requests told they are done.
        Highest row first: each removal moves the last row, which is then never one still to remove."""
        for i in sorted(rows, reverse=True):
            s = self.running[i]
            absorbed = s.req.prompt_ids + s.generated[:-1]  # the last sampled token was never fed
            state = None
            if keep and (s.req.return_state or s.req.start_state is None):
                state = self.batch.take(i)
                if s.req.start_state is None:
                    self.state_cache.put(absorbed, state)
            if keep:
                unabsorbed = s.generated[-1] if s.generated and s.generated[-1] not in s.params.stop_ids else None
                self._emit(s.req, self._done_event(s, s.prompt_logprobs, state if s.req.return_state else None,
                                                   unabsorbed))
            self.reserved -= s.req.reserved
            if s.index == 0:
                self.requests_done += 1
            self.batch.remove(i)
            self.running[i] = self.running[-1]
            self.running.pop()

    def _done_event(self, s: _Seq, prompt_logprobs, state=None, unabsorbed=None) -> Event:
        rest, s.emitted = s.text[s.emitted - s.start:], s.start + len(s.text)
        return Event("done", index=s.index, text=rest, finish_reason=s.finish_reason,
                     prompt_tokens=len(s.req.prompt_ids), completion_tokens=len(s.generated), cached_tokens=s.cached,
                     prompt_logprobs=prompt_logprobs, state=state, unabsorbed=unabsorbed)


def _token_logprob(lp: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
    """The log-probability of `token` under `lp [V]` and the `top` most likely alternatives."""
    alternatives = []
    if top:
        values, ids = lp.topk(min(top, lp.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(lp[token]), alternatives)
