"""`kitelm chat`: an interactive conversation that continues from its kept state, turn after turn.

After each reply the conversation's state (the model's inference cache after the last absorbed token) is held, and
the next turn prefills only its own tokens: the template's text between the end of the reply and the start of the
next reply (for Gemma `<end_of_turn>\\n<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n`). Turn 50
therefore costs what turn 1 does for Griffin/Hawk. `/save FILE` writes that state (a fixed-size file for Griffin and
Hawk), `--load FILE` resumes it, `/reset` starts over.

The delta of a turn is found by rendering a two-message stand-in conversation with and without the new user
message, so any template that renders turns one after the other works (the checkpoint's, or `--chat-template`).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import KitelmError
from .engine import Engine, GenerationParams, Request
from .state import load_state, save_state
from .templates import ChatTemplate

_REPLY = "\u2063kitelm-reply\u2063"  # a stand-in reply no real text contains (invisible separators around it)


def next_turn_text(template: ChatTemplate, user_text: str) -> str:
    """The template's text from the end of an assistant reply to the start of the next reply, around `user_text`."""
    before = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _REPLY}]
    full = template.render(before + [{"role": "user", "content": user_text}], add_generation_prompt=True)
    at = full.find(_REPLY)
    if at < 0:
        raise KitelmError("the chat template does not render assistant messages; kitelm chat cannot continue turns")
    return full[at + len(_REPLY):]


@dataclass
class ChatOptions:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


class ChatSession:
    """One conversation on an engine: `say(text, on_text)` streams the reply and returns it."""

    def __init__(self, engine: Engine, template: ChatTemplate, options: ChatOptions):
        self.engine, self.template, self.options = engine, template, options
        self.reset()

    def reset(self) -> None:
        self.state = None  # the conversation's cache after its last absorbed token
        self.pending: list[int] = []  # sampled but not yet absorbed (a reply cut by max_tokens ends with one)
        self.turns = 0
        self.last_stats: dict = {}

    def say(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> str:
        if self.state is None:
            ids = self.template.prompt_ids([{"role": "user", "content": text}])
        else:
            ids = self.pending + self.template.encode(next_turn_text(self.template, text))
        events: queue.SimpleQueue = queue.SimpleQueue()
        o = self.options
        params = GenerationParams(max_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                                  seed=None if o.seed is None else o.seed + self.turns,
                                  stop_ids=frozenset(self.template.stop_ids))
        req = Request(ids, params, events.put, start_state=self.state, return_state=True)
        t0 = time.perf_counter()
        self.engine.submit(req)
        reply, first = [], None
        try:
            while True:
                ev = events.get()
                if ev.kind == "error":
                    raise KitelmError(ev.message)
                if ev.text:
                    first = first or time.perf_counter()
                    reply.append(ev.text)
                    on_text(ev.text)
                if ev.kind == "done":
                    break
        except BaseException:
            req.abort()  # Ctrl-C: the turn is dropped, the conversation stays at its previous state
            raise
        self.state, self.pending = ev.state, [] if ev.unabsorbed is None else [ev.unabsorbed]
        self.turns += 1
        elapsed = time.perf_counter() - t0
        self.last_stats = {"prompt_tokens": len(ids), "completion_tokens": ev.completion_tokens,
                           "ttft_s": (first or time.perf_counter()) - t0, "seconds": elapsed,
                           "finish_reason": ev.finish_reason}
        return "".join(reply)

    def save(self, path) -> None:
        if self.state is None:
            raise KitelmError("nothing to save yet: say something first")
        save_state(self.state, path, {"pending": f"{self.pending[0] if self.pending else -1:+012d}",
                                      "turns": f"{self.turns:012d}"})

    def load(self, path) -> None:
        self.state, meta = load_state(self.engine.model, path)
        pending = int(meta.get("pending", "-1"))
        self.pending = [] if pending < 0 else [pending]
        self.turns = int(meta.get("turns", "0"))


HELP = "commands: /reset (new conversation), /save FILE (write its state), /quit; anything else is your turn"


def run_chat(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The terminal loop: `read(prompt)` returns a line (EOFError ends), `write(text)` shows text."""
    write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            session.reset()
            write("(new conversation)\n")
            continue
        if text.startswith("/save"):
            path = text[len("/save"):].strip()
            if not path:
                write("usage: /save FILE\n")
                continue
            try:
                session.save(path)
                write(f"(saved the conversation state to {path})\n")
            except KitelmError as err:
                write(f"error: {err}\n")
            continue
        if text.startswith("/"):
            write(HELP + "\n")
            continue
        write("model> ")
        try:
            session.say(text, write)
        except KeyboardInterrupt:
            write("\n(interrupted; the conversation is where it was before this turn)\n")
            continue
        except KitelmError as err:
            write(f"\nerror: {err}\n")
            continue
        s = session.last_stats
        write(f"\n[{s['prompt_tokens']} new prompt tokens, {s['completion_tokens']} generated, first token after "
              f"{s['ttft_s'] * 1000:.0f} ms, {s['finish_reason']}]\n")
