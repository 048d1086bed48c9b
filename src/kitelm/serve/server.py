"""Running the app: `serve(lm, ...)` blocks (the `kitelm serve` command); `ServerThread` runs it in the background on
a loopback socket (tests, the benchmark)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from ..errors import KitelmError
from .app import MAX_BODY_BYTES, ServerSettings, create_app
from .engine import Engine
from .templates import load_chat_template


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    api_key: str | None = None
    max_seqs: int = 16
    max_memory: int | None = None  # bytes of inference state for running sequences
    max_queue: int = 64
    state_cache_bytes: int = 256 << 20
    prefill_chunk: int = 256
    chat_template: str | None = None  # a Jinja2 file overriding the checkpoint's template
    max_body_bytes: int = MAX_BODY_BYTES
    default_chat_max_tokens: int = 512


def build(lm, options: ServeOptions):
    """(engine, app) for an `LM`; the engine is started."""
    template = load_chat_template(lm.tokenizer, lm.path, options.chat_template)
    engine = Engine(lm.model, lm.tokenizer, max_seqs=options.max_seqs, max_memory=options.max_memory,
                    max_queue=options.max_queue, state_cache_bytes=options.state_cache_bytes,
                    prefill_chunk=options.prefill_chunk)
    name = options.model_name or (lm.path.name if lm.path is not None else lm.config.name)
    settings = ServerSettings(name, options.api_key, options.max_body_bytes, options.default_chat_max_tokens)
    app = create_app(engine, template, settings)
    return engine.start(), app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY. asyncio sets it only on sockets created with proto=IPPROTO_TCP; without
    # it every response waits ~40 ms (Nagle against the client's delayed ACK: headers and body are two writes).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections made after the banner wait in the backlog until uvicorn accepts them
    except OSError as err:
        sock.close()
        raise KitelmError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port") from None
    return sock


def serve(lm, options: ServeOptions, log=print) -> None:
    """Serve `lm` until interrupted."""
    import uvicorn

    engine, app = build(lm, options)
    sock = _bind(options.host, options.port)
    kind = "fixed state" if engine.bounded else "state without KV"
    log(f"kitelm serve: http://{options.host}:{sock.getsockname()[1]}/v1 ({kind} {engine.seq_bytes} bytes per "
        f"sequence, at most {engine.max_seqs} sequences; Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()


class ServerThread:
    """The server on 127.0.0.1 and a free port, in a daemon thread: `with ServerThread(lm) as s: s.base_url`."""

    def __init__(self, lm, options: ServeOptions | None = None):
        import uvicorn

        self.options = options or ServeOptions()
        self.engine, self.app = build(lm, self.options)
        self.sock = _bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.close()
                raise KitelmError("the server did not start within 30 s")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.engine.stop()
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.close()
