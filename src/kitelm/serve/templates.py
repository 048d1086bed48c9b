"""Chat templates: messages → prompt text → token ids, rendered with Jinja2 as transformers renders them.

The template comes from (first found) `--chat-template FILE`, the checkpoint's `chat_template.jinja`, or the
`chat_template` field of its `tokenizer_config.json` (kept by `kitelm convert`); otherwise `DEFAULT_TEMPLATE`.
As in transformers (`apply_chat_template`): a sandboxed environment with `trim_blocks` and `lstrip_blocks`, the
variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, the function `raise_exception` and the
`tojson` filter. A template's `raise_exception` (e.g. Gemma's "roles must alternate") is a `TemplateError`.

Special-token strings in the rendered text (`bos_token`, `eos_token`, end-of-turn markers) become their single ids
whatever the tokenizer would make of them; generation stops at the tokenizer's EOS and at the end-of-turn token.

The default template, for kitelm-trained models (byte or BPE tokenizer, EOS `<|endoftext|>`):

    <|user|>
    {content}<|endoftext|>
    <|assistant|>
    {content}<|endoftext|>

one block per message (`<|system|>` too), then `<|assistant|>\\n` for the reply, which ends at `<|endoftext|>`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import KitelmError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
END_OF_TURN_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")  # Gemma, ChatML, Llama 3, Phi
ROLES = ("system", "user", "assistant", "developer")


class TemplateError(KitelmError):
    """The template failed on these messages (HTTP 400)."""


def _raise_exception(message):
    raise TemplateError(str(message))


class ChatTemplate:
    """`render(messages)` → text; `encode(text)` → ids with special-token strings mapped to their ids."""

    def __init__(self, source: str, tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 origin: str = "default"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.tokenizer, self.origin = source, tokenizer, origin
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                        ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise KitelmError(f"the chat template ({origin}) is not valid Jinja2: {err.message} (line {err.lineno})")\
                from None
        self.bos_token, self.eos_token = bos_token, eos_token or "<|endoftext|>"
        self.specials: dict[str, int] = {}
        if bos_token and tokenizer.bos_id is not None:
            self.specials[bos_token] = tokenizer.bos_id
        self.specials[self.eos_token] = tokenizer.eos_id
        self.stop_ids = {tokenizer.eos_id}
        for marker in END_OF_TURN_MARKERS:
            if marker in source:
                ids = tokenizer.encode(marker)
                if len(ids) == 1:
                    self.specials[marker] = ids[0]
                    self.stop_ids.add(ids[0])

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token or "", eos_token=self.eos_token)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as err:
            raise TemplateError(f"the chat template ({self.origin}) failed on these messages: {err}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text; each special-token string becomes its id."""
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in self.specials if s and s in rest]
            if not hits:
                ids += self.tokenizer.encode(rest)
                break
            at, special = min(hits)
            if at:
                ids += self.tokenizer.encode(rest[:at])
            ids.append(self.specials[special])
            rest = rest[at + len(special):]
        return ids

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Messages → prompt ids, BOS first when the tokenizer has one and the template did not write it."""
        ids = self.encode(self.render(messages))
        bos = self.tokenizer.bos_id
        return ([bos] if bos is not None and (not ids or ids[0] != bos) else []) + ids


def _config_template(folder: Path) -> tuple[str | None, dict]:
    """(chat_template, tokenizer_config) found in a checkpoint folder."""
    config: dict = {}
    path = folder / "tokenizer_config.json"
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise KitelmError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(), config
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return (template if isinstance(template, str) else None), config


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_chat_template(tokenizer, folder: str | Path | None, override: str | Path | None = None) -> ChatTemplate:
    """The chat template of a checkpoint (see the module docstring for the order of sources)."""
    source, config = (None, {})
    if folder is not None:
        folder = Path(folder)
        source, config = _config_template(folder if folder.is_dir() else folder.parent)
    bos = _token_text(config.get("bos_token"))
    eos = _token_text(config.get("eos_token"))
    if bos is None and tokenizer.bos_id is not None and hasattr(tokenizer, "sp"):
        bos = tokenizer.sp.IdToPiece(tokenizer.bos_id)
    if eos is None and hasattr(tokenizer, "sp"):
        eos = tokenizer.sp.IdToPiece(tokenizer.eos_id)
    origin = f"{folder}/tokenizer_config.json" if source else "default"
    if override is not None:
        try:
            source, origin = Path(override).read_text(), str(override)
        except OSError as err:
            raise KitelmError(f"cannot read chat template {override} ({err.strerror or err})") from None
    return ChatTemplate(source or DEFAULT_TEMPLATE, tokenizer, bos, eos, origin)
