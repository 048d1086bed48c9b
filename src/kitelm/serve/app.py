"""The OpenAI-compatible HTTP app on FastAPI: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`: 400 for invalid requests
(malformed JSON, wrong types, bad values, a template failure, a prompt beyond the context), 401 without the API key,
404 for an unknown model or route, 413 for a body over the size limit, 429 (with Retry-After) when the waiting queue
is full, 500 if generation itself fails. No request can stop the engine or the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import KitelmError
from .engine import ContextTooLong, Engine, Event, GenerationParams, QueueFull, Request
from .templates import ROLES, ChatTemplate, TemplateError

MAX_BODY_BYTES = 4 << 20  # request bodies above 4 MiB are refused (413)
MAX_TOKENS_LIMIT = 1 << 16  # more than this is absurd for one request
Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (status, message, type_, param,
                                                                                      code, headers)


class _Dispatcher:
    """Hands engine events (engine thread) to their asyncio queues (event-loop thread) with one loop wake-up per
    burst of events, not one per token: the engine emits one event per running sequence per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.scheduled = loop, deque(), False

    def send(self, events: asyncio.Queue, event: Event) -> None:
        self.pending.append((events, event))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
                pass

    def _drain(self) -> None:
        self.scheduled = False
        while self.pending:
            events, event = self.pending.popleft()
            events.put_nowait(event)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


# ---------------------------------------------------------------------- request schemas (OpenAI fields; extras ignored)
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(1, ge=1, le=64)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: run to max_tokens (benchmarks)
    # OpenAI fields this server does not implement: refused when set to anything but their neutral value
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> str | None:
        """The first field set to a value this server cannot honour, if any."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name
        if self.logit_bias:
            return "logit_bias"
        for name in ("tools", "functions", "suffix"):
            if getattr(self, name):
                return name
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        if self.best_of not in (None, 1):
            return "best_of"
        return None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    default_chat_max_tokens: int = 512


def _usage(events: list[Event]) -> dict:
    prompt = sum(e.prompt_tokens for e in events if e.index == 0)
    completion = sum(e.completion_tokens for e in events)
    cached = sum(e.cached_tokens for e in events if e.index == 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _rss_bytes() -> tuple[int, int]:
    """(current, peak) resident memory of this process, from /proc (0 where unavailable)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        kb = lambda k: int(fields[k].split()[0]) * 1024  # noqa: E731
        return kb("VmRSS"), kb("VmHWM")
    except (OSError, KeyError, ValueError):
        return 0, 0


def create_app(engine: Engine, template: ChatTemplate, settings: ServerSettings) -> FastAPI:
    """The FastAPI app over a started `engine`; `template` renders chat messages."""
    app = FastAPI(title="kitelm", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer
    started = int(time.time())
    api_key = settings.api_key

    @app.exception_handler(APIError)
    async def _api_error(_, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "We could not parse the JSON body of your request. (The request body is "
                                  "not valid JSON.)", code="invalid_json")
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(400, f"Invalid request: {message}", param=loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else None
        return error_response(err.status_code, str(err.detail), code=code)

    @app.exception_handler(Exception)
    async def _internal(_, err: Exception):
        return error_response(500, f"internal server error: {type(err).__name__}", "server_error")

    @app.middleware("http")
    async def _guard(request: HTTPRequest, call_next):
        if request.url.path.startswith("/v1/") and api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                                      code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(413, f"the request body exceeds {settings.max_body_bytes} bytes",
                                  code="request_too_large")
        if request.method == "POST" and length is None:  # chunked upload: count the bytes as they come
            body = b""
            async for piece in request.stream():
                body += piece
                if len(body) > settings.max_body_bytes:
                    return error_response(413, f"the request body exceeds {settings.max_body_bytes} bytes",
                                          code="request_too_large")
            request._body = body
        return await call_next(request)

    def check_request(body: _Sampling) -> None:
        field = body.unsupported()
        if field is not None:
            raise APIError(400, f"{field} is not supported by this server; leave it out", param=field,
                           code="unsupported_parameter")
        name = body.model
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{settings.model_name}' (see GET /v1/models).", param="model",
                           code="model_not_found")

    def params_of(body: _Sampling, max_tokens: int, stop_ids=frozenset(), logprobs=None, prompt_logprobs=False):
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 16:
            raise APIError(400, "stop: at most 16 stop sequences", param="stop")
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        return GenerationParams(max_tokens=max_tokens, temperature=temperature,
                                top_p=None if body.top_p is None else float(body.top_p), top_k=body.top_k,
                                seed=body.seed, stop=tuple(s for s in stop if s), stop_ids=frozenset(stop_ids),
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    dispatchers: dict[int, _Dispatcher] = {}

    def submit(prompt_ids: list[int], params: GenerationParams, n: int) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        dispatcher = dispatchers.get(id(loop)) or dispatchers.setdefault(id(loop), _Dispatcher(loop))
        events: asyncio.Queue = asyncio.Queue()
        req = Request(prompt_ids, params, lambda ev: dispatcher.send(events, ev), n=n)
        try:
            engine.submit(req)
        except QueueFull as err:
            raise APIError(429, str(err), "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except ContextTooLong as err:
            raise APIError(400, str(err), param="messages", code="context_length_exceeded") from None
        except KitelmError as err:
            raise APIError(400, str(err)) from None
        return req, events

    async def collect(request: HTTPRequest, jobs: list[tuple[Request, asyncio.Queue]]) -> list[list[Event]]:
        """Every job's events until its n choices are done; aborts all of them if the client goes away (checked
        every 0.5 s, not per event)."""

        async def events_of_all() -> list[list[Event]]:
            out: list[list[Event]] = []
            for req, events in jobs:
                got: list[Event] = []
                done = 0
                while done < req.n:
                    ev = await events.get()
                    if ev.kind == "error":
                        raise APIError(500, ev.message, "server_error")
                    got.append(ev)
                    done += ev.kind == "done"
                out.append(got)
            return out

        task = asyncio.ensure_future(events_of_all())
        try:
            while True:
                finished, _ = await asyncio.wait({task}, timeout=0.5)
                if finished:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise asyncio.CancelledError
        finally:
            task.cancel()
            for req, _ in jobs:
                req.abort()  # no-op for finished requests; frees the slots of a client that left

    def token_str(token: int) -> str:
        return tokenizer.decode([token])

    # ---------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, 200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "kitelm"}]}

    @app.get("/metrics")
    async def metrics():
        rss, peak = _rss_bytes()
        cache = engine.state_cache
        rows = [
            ("kitelm_queue_depth", "gauge", "requests waiting for admission", engine.queue_depth),
            ("kitelm_running_sequences", "gauge", "sequences decoding in the batch", len(engine.running)),
            ("kitelm_prefilling_requests", "gauge", "admitted requests still prefilling", len(engine.prefilling)),
            ("kitelm_reserved_state_bytes", "gauge", "inference-state bytes reserved by admitted sequences",
             engine.reserved),
            ("kitelm_sequence_state_bytes", "gauge", "fixed state bytes of one sequence (KV models: without tokens)",
             engine.seq_bytes),
            ("kitelm_tokens_per_second", "gauge", "generated tokens per second over the last 10 s",
             round(engine.tokens_per_second(), 3)),
            ("kitelm_generated_tokens_total", "counter", "tokens generated", engine.generated_tokens),
            ("kitelm_prompt_tokens_total", "counter", "prompt tokens prefilled (not counting kept state)",
             engine.prompt_tokens),
            ("kitelm_requests_total", "counter", "requests finished", engine.requests_done),
            ("kitelm_state_cache_hits_total", "counter", "requests continued from a kept state", cache.hits),
            ("kitelm_state_cache_misses_total", "counter", "requests without a kept state", cache.misses),
            ("kitelm_state_cache_hit_tokens_total", "counter", "prompt tokens served from kept state",
             cache.hit_tokens),
            ("kitelm_state_cache_evictions_total", "counter", "kept states evicted", cache.evictions),
            ("kitelm_state_cache_bytes", "gauge", "bytes of kept states", cache.bytes),
            ("kitelm_state_cache_entries", "gauge", "kept states", len(cache)),
            ("kitelm_process_resident_memory_bytes", "gauge", "resident set size of the server process", rss),
            ("kitelm_process_peak_resident_memory_bytes", "gauge", "peak resident set size (VmHWM)", peak),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_request(body)
        prompts = body.prompt
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt: give a string, a list of strings or token ids", param="prompt")
        if len(prompts) * body.n > engine.max_seqs * 4:
            raise APIError(400, f"too many choices: {len(prompts)} prompts x n={body.n}", param="n")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        if body.stream and (body.echo or max_tokens == 0):
            raise APIError(400, "echo and max_tokens=0 are not supported with stream=true", param="stream")
        encoded = []
        for p in prompts:
            try:
                ids = list(p) if isinstance(p, list) else _encode_prompt(engine, p)
            except KitelmError as err:
                raise APIError(400, str(err), param="prompt") from None
            if not ids:
                raise APIError(400, "prompt: the prompt encodes to no tokens", param="prompt")
            encoded.append(ids)
        score = body.echo and body.logprobs is not None
        params = params_of(body, max_tokens, () if body.ignore_eos else {tokenizer.eos_id}, body.logprobs,
                           prompt_logprobs=score)
        jobs = []
        try:
            for ids in encoded:
                jobs.append(submit(ids, params, body.n))
        except APIError:
            for req, _ in jobs:  # all prompts run or none: the ones already queued are withdrawn
                req.abort()
            raise
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if body.stream:
            return _sse(_stream_completion(jobs, rid, created, settings.model_name, body, token_str))
        results = await collect(request, jobs)
        choices = []
        for p_index, (ids, events) in enumerate(zip(encoded, results)):
            for i in range(body.n):
                mine = [e for e in events if e.index == i]
                done = mine[-1]
                text = "".join(e.text for e in mine)
                logprobs = None
                if body.logprobs is not None:
                    lps = [lp for e in mine for lp in e.logprobs]
                    logprobs = _completion_logprobs(lps, token_str, done.prompt_logprobs if body.echo else None,
                                                    ids if body.echo else None)
                if body.echo:
                    text = (tokenizer.decode(ids) if isinstance(prompts[p_index], list) else prompts[p_index]) + text
                choices.append({"index": p_index * body.n + i, "text": text, "logprobs": logprobs,
                                "finish_reason": done.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                "choices": choices, "usage": _usage([e for ev in results for e in ev if e.kind == "done"])}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest):
        check_request(body)
        messages = []
        for i, m in enumerate(body.messages):
            if m.role not in ROLES:
                raise APIError(400, f"messages[{i}].role: '{m.role}' is not one of {list(ROLES)}",
                               param=f"messages[{i}].role")
            content = m.content
            if isinstance(content, list):
                if any(not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"),
                                                                                                   str)
                       for part in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(part["text"] for part in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            ids = template.prompt_ids(messages)
        except TemplateError as err:
            raise APIError(400, str(err), param="messages") from None
        except KitelmError as err:
            raise APIError(400, str(err), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = settings.default_chat_max_tokens
            if engine.context is not None:
                max_tokens = min(max_tokens, max(engine.context - len(ids), 1))
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = params_of(body, max_tokens, () if body.ignore_eos else template.stop_ids, top)
        job = submit(ids, params, body.n)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(_stream_chat(job, rid, created, settings.model_name, include_usage, token_str))
        (events,) = await collect(request, [job])
        choices = []
        for i in range(body.n):
            mine = [e for e in events if e.index == i]
            logprobs = None
            if body.logprobs:
                logprobs = {"content": [_chat_logprob(lp, token_str) for e in mine for lp in e.logprobs]}
            choices.append({"index": i, "message": {"role": "assistant", "content": "".join(e.text for e in mine)},
                            "logprobs": logprobs, "finish_reason": mine[-1].finish_reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": choices, "usage": _usage([e for e in events if e.kind == "done"])}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def not_found(path: str):
        raise APIError(404, f"no route /{path}; this server has /v1/completions, /v1/chat/completions, "
                            "/v1/models, /health and /metrics", code="not_found")

    return app


def _encode_prompt(engine: Engine, text: str) -> list[int]:
    tok = engine.tokenizer
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)


def _completion_logprobs(lps, token_str, prompt_lps, prompt_ids) -> dict:
    """The legacy completions `logprobs` object; with echo the prompt tokens come first (the first one scored None)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    entries = []
    if prompt_ids is not None:
        entries += list(zip(prompt_ids, prompt_lps or [None] * len(prompt_ids)))
    entries += [(lp.token, lp) for lp in lps]
    for token, lp in entries:
        s = token_str(token)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        token_logprobs.append(None if lp is None else lp.logprob)
        top.append(None if lp is None else {token_str(t): v for t, v in lp.top} or {s: lp.logprob})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprob(lp, token_str) -> dict:
    s = token_str(lp.token)
    return {"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
            "top_logprobs": [{"token": token_str(t), "logprob": v, "bytes": list(token_str(t).encode())}
                             for t, v in lp.top]}


def _sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(job: tuple[Request, asyncio.Queue]):
    """A job's events until its n choices are done; the request is aborted when the stream ends early."""
    req, events = job
    done = 0
    try:  # a client that leaves cancels this generator (Starlette's StreamingResponse listens for the disconnect)
        while done < req.n:
            ev = await events.get()
            yield ev
            if ev.kind == "error":
                return
            done += ev.kind == "done"
    finally:
        req.abort()


def _error_chunk(message: str) -> str:
    return _data({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def _stream_chat(job, rid, created, model, include_usage, token_str):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    for i in range(job[0].n):
        yield _data({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
    finals = []
    async for ev in _events(job):
        if ev.kind == "error":
            yield _error_chunk(ev.message)
            return
        if ev.text:
            yield _data({**base, "choices": [{"index": ev.index, "delta": {"content": ev.text}, "logprobs": None,
                                              "finish_reason": None}]})
        if ev.kind == "done":
            finals.append(ev)
            yield _data({**base, "choices": [{"index": ev.index, "delta": {}, "logprobs": None,
                                              "finish_reason": ev.finish_reason}]})
    if len(finals) < job[0].n:
        return
    if include_usage:
        yield _data({**base, "choices": [], "usage": _usage(finals)})
    yield "data: [DONE]\n\n"


async def _stream_completion(jobs, rid, created, model, body, token_str):
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    finals = []
    for p_index, job in enumerate(jobs):
        async for ev in _events(job):
            if ev.kind == "error":
                yield _error_chunk(ev.message)
                return
            index = p_index * body.n + ev.index
            logprobs = _completion_logprobs(ev.logprobs, token_str, None, None) if body.logprobs is not None \
                and ev.logprobs else None
            if ev.text or logprobs:
                yield _data({**base, "choices": [{"index": index, "text": ev.text, "logprobs": logprobs,
                                                  "finish_reason": None}]})
            if ev.kind == "done":
                finals.append(ev)
                yield _data({**base, "choices": [{"index": index, "text": "", "logprobs": None,
                                                  "finish_reason": ev.finish_reason}]})
    if len(finals) < len(jobs) * body.n:
        return
    if include_usage:
        yield _data({**base, "choices": [], "usage": _usage(finals)})
    yield "data: [DONE]\n\n"


def env_api_key() -> str | None:
    """The API key from the environment (`KITELM_API_KEY`), if set."""
    return os.environ.get("KITELM_API_KEY") or None
