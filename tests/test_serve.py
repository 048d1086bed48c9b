"""`kitelm serve`: the OpenAI client against a server on a free loopback port, the engine's batching and kept state,
chat templates, bad input. Models are tiny random-weight models whose output head cannot pick a non-ASCII byte or
EOS, so greedy text round-trips through the byte tokenizer and runs for exactly max_tokens. Last, the streamed text
(`LM.stream_ids`, the engine) on random ids, split multi-byte characters included."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import openai
import pytest
import torch

from kitelm.api import LM
from kitelm.data.corpus import load_corpus
from kitelm.data.dataset import build_tokenizer
from kitelm.data.tokenizer import ByteTokenizer, IncrementalDetokenizer, SentencePieceTokenizer
from kitelm.generate import Sampling, generate_tokens
from kitelm.models import build_model
from kitelm.presets import get_preset
from kitelm.serve.engine import Engine, GenerationParams, Request, _Seq
from kitelm.serve.server import ServeOptions, ServerThread
from kitelm.serve.state import load_state, save_state
from kitelm.serve.templates import ChatTemplate, load_chat_template

ARCHS = ["griffin-tiny", "transformer-tiny"]
GEMMA_TEMPLATE = (  # google/recurrentgemma-2b-it tokenizer_config.json "chat_template"
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def tiny_lm(preset: str, **changes) -> LM:
    torch.manual_seed(0)
    model = build_model(get_preset(preset).replace(tie_embeddings=False, **changes)).eval()
    with torch.no_grad():
        model.head.weight[128:] = 0  # logit 0 for non-ASCII bytes and EOS: greedy picks the best ASCII byte
    return LM(model, ByteTokenizer())


@pytest.fixture(scope="module", params=ARCHS)
def server(request):
    lm = tiny_lm(request.param)
    with ServerThread(lm, ServeOptions(max_seqs=4, prefill_chunk=16)) as s:
        s.lm, s.name = lm, lm.config.name
        # 300 s: a first-use build of the C++ kernels (~45 s, more on a loaded machine) may run inside a request
        s.client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=300)
        yield s


def solo(lm: LM, prompt: str, n: int) -> str:
    return lm.generate(prompt, max_new_tokens=n, temperature=0.0)


def metric(s, name: str) -> float:
    text = httpx.get(s.base_url.removesuffix("/v1") + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


# ---------------------------------------------------------------------- OpenAI client
def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client.models.list().data] == [server.name]


def test_greedy_completion_equals_lm_generate(server):
    for prompt in ("def fib(n):", "hello world, this is a longer prompt than one chunk of sixteen"):
        r = server.client.completions.create(model=server.name, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == solo(server.lm, prompt, 24)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(prompt)


def test_chat_streams_deltas_then_finish_reason_then_done(server):
    messages = [{"role": "user", "content": "Say something."}]
    full = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=12, temperature=0)
    chunks = list(server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=12,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len(text) == 12
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 12
    with httpx.stream("POST", server.base_url + "/chat/completions", json={"messages": messages, "max_tokens": 3,
                                                                           "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_text_before_it(server):
    free = solo(server.lm, "stop here:", 20)
    stop = free[5:7]
    r = server.client.completions.create(model=server.name, prompt="stop here:", max_tokens=20, temperature=0,
                                         stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[:free.index(stop)]


def test_n_choices_and_seed_reproducibility(server):
    kwargs = dict(model=server.name, prompt="sample me", max_tokens=16, temperature=1.0, n=3, seed=1234)
    a = server.client.completions.create(**kwargs)
    b = server.client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice has its own generator
    c = server.client.completions.create(**{**kwargs, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_continued_conversation_equals_cold_request_with_whole_history(server):
    history = [{"role": "user", "content": "First question?"}]
    first = server.client.chat.completions.create(model=server.name, messages=history, max_tokens=10, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And the second?"}]
    warm = server.client.chat.completions.create(model=server.name, messages=history, max_tokens=10, temperature=0)
    assert warm.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens  # continued from kept state
    assert metric(server, "kitelm_state_cache_hits_total") >= 1 and metric(server, "kitelm_state_cache_bytes") > 0
    server.engine.state_cache.clear()
    cold = server.client.chat.completions.create(model=server.name, messages=history, max_tokens=10, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.choices[0].message.content == cold.choices[0].message.content


def test_concurrent_clients_each_get_their_solo_output(server):
    prompts = [f"client {i} says " + "x" * (3 * i) for i in range(7)]  # 7 clients, 4 slots: joins and queueing
    expected = [solo(server.lm, p, 20) for p in prompts]
    got: dict[int, str] = {}

    def run(i):
        stream = server.client.completions.create(model=server.name, prompt=prompts[i], max_tokens=20,
                                                  temperature=0, stream=True)
        got[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got.get(i) for i in range(len(prompts))] == expected


def test_disconnect_mid_stream_frees_the_slot(server):
    if not server.engine.bounded:
        pytest.skip("the transformer's 128-token context ends a stream before a client could leave it")
    with httpx.stream("POST", server.base_url + "/completions",
                      json={"prompt": "long one", "max_tokens": 60000, "stream": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break
    deadline = time.monotonic() + 20
    while metric(server, "kitelm_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "kitelm_running_sequences") == 0
    assert metric(server, "kitelm_generated_tokens_total") < 50000  # it left long before max_tokens
    r = server.client.completions.create(model=server.name, prompt="still up", max_tokens=4, temperature=0)
    assert r.choices[0].text == solo(server.lm, "still up", 4)


def test_echo_logprobs_with_max_tokens_0_scores_the_prompt(server):
    """lm-evaluation-harness local-completions scoring: echo + logprobs, max_tokens 0."""
    prompt = "score this text"
    r = server.client.completions.create(model=server.name, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                         temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and lp.tokens == list(prompt) and lp.token_logprobs[0] is None
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        ref = torch.log_softmax(server.lm.model(ids)[0].float(), -1)
    expected = [float(ref[i, ids[0, i + 1]]) for i in range(len(prompt) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    tokens = server.client.completions.create(model=server.name, prompt=list(prompt.encode()), max_tokens=1,
                                              echo=True, logprobs=0, temperature=0)  # token-id prompts too
    assert tokens.choices[0].logprobs.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------- bad input
def _post(s, path, body, headers=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(s.base_url + path, content=content,
                      headers={"content-type": "application/json", **(headers or {})})


def test_bad_inputs_get_openai_errors_and_the_server_stays_up(server):
    ok_chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("/completions", b"{not json", 400),
        ("/completions", {"prompt": 5}, 400),
        ("/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
        ("/completions", {"prompt": "x", "max_tokens": -1}, 400),
        ("/completions", {"prompt": "x", "max_tokens": 10**12}, 400),
        ("/completions", {"prompt": "x", "temperature": -1}, 400),
        ("/completions", {"prompt": "x", "model": "gpt-17"}, 404),
        ("/completions", {"prompt": ""}, 400),
        ("/completions", {"prompt": [300]}, 400),
        ("/chat/completions", {"messages": []}, 400),
        ("/chat/completions", {"messages": "hi"}, 400),
        ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("/chat/completions", {**ok_chat, "n": 0}, 400),
        ("/chat/completions", {**ok_chat, "frequency_penalty": 0.5}, 400),  # not implemented: refused, not ignored
        ("/chat/completions", {**ok_chat, "tools": [{"type": "function"}]}, 400),
        ("/nowhere", {}, 404),
    ]
    for path, body, status in cases:
        r = _post(server, path, body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    streamed: list[str] = []

    def stream():  # a well-formed stream running through the flood
        chunks = server.client.completions.create(model=server.name, prompt="steady", max_tokens=100, temperature=0,
                                                  stream=True)
        streamed.append("".join(c.choices[0].text for c in chunks if c.choices))

    streamer = threading.Thread(target=stream)
    streamer.start()
    with httpx.Client(base_url=server.base_url, headers={"content-type": "application/json"}) as flood:
        for i in range(1000):  # a flood of malformed requests on one connection
            assert flood.post("/chat/completions", content=b"{" * (i % 7 + 1)).status_code == 400
    streamer.join(timeout=120)
    assert streamed == [solo(server.lm, "steady", 100)]
    assert _post(server, "/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}').status_code == 413
    r = server.client.chat.completions.create(model=server.name, messages=ok_chat["messages"], max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert httpx.get(server.base_url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_prompt_beyond_transformer_context_is_400():
    lm = tiny_lm("transformer-tiny")  # max_seq_len 128
    with ServerThread(lm) as s:
        r = _post(s, "/completions", {"prompt": "y" * 120, "max_tokens": 20})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert _post(s, "/completions", {"prompt": "y" * 100, "max_tokens": 20}).status_code == 200


def test_api_key_full_queue_and_bad_template(tmp_path):
    lm = tiny_lm("hawk-tiny")
    with ServerThread(lm, ServeOptions(api_key="sekrit", max_queue=0)) as s:
        assert _post(s, "/completions", {"prompt": "x"}).status_code == 401
        r = _post(s, "/completions", {"prompt": "x"}, headers={"authorization": "Bearer sekrit"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    (tmp_path / "strict.jinja").write_text(GEMMA_TEMPLATE)
    with ServerThread(lm, ServeOptions(chat_template=str(tmp_path / "strict.jinja"))) as s:
        r = _post(s, "/chat/completions", {"messages": [{"role": "system", "content": "x"}]})
        assert r.status_code == 400 and "System role not supported" in r.json()["error"]["message"]
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(Exception, match="not valid Jinja2"):
        load_chat_template(lm.tokenizer, None, tmp_path / "broken.jinja")


# ---------------------------------------------------------------------- engine, kept state, templates
def _run(engine: Engine, prompt: list[int], max_tokens: int, **kw):
    done = threading.Event()
    out: dict = {"ids": []}

    def on_event(ev):
        if ev.kind == "token":
            out["ids"] += ev.token_ids
        elif ev.kind in ("done", "error"):
            out["done"] = ev
            done.set()

    engine.submit(Request(prompt, GenerationParams(max_tokens=max_tokens, temperature=0.0), on_event, **kw))
    assert done.wait(300)
    return out["ids"], out["done"]


@pytest.mark.parametrize("preset", ["griffin-tiny", "transformer-tiny", "hawk-tiny", "griffin-sas-tiny"])
def test_greedy_output_identical_with_and_without_kept_state(preset):
    lm = tiny_lm(preset)
    engine = Engine(lm.model, lm.tokenizer, max_seqs=3, prefill_chunk=5).start()
    try:
        first = list(b"a prompt longer than the local window of sixteen")
        gen, done = _run(engine, first, 20)
        follow = first + gen[:-1] + list(b" then more")
        warm, warm_done = _run(engine, follow, 20)
        assert warm_done.cached_tokens == len(first) + len(gen) - 1
        ref = [int(t) for t in generate_tokens(lm.model, [follow], 20, Sampling(0.0))]
        assert warm == ref
    finally:
        engine.stop()


def test_griffin_state_file_has_a_fixed_size(tmp_path):
    lm = tiny_lm("griffin-tiny")
    engine = Engine(lm.model, lm.tokenizer).start()
    try:
        sizes = []
        for n in (5, 60):
            _, done = _run(engine, list(b"x" * n), 3, return_state=True)
            save_state(done.state, tmp_path / f"s{n}.state")
            sizes.append((tmp_path / f"s{n}.state").stat().st_size)
        assert sizes[0] == sizes[1]
        state, _ = load_state(lm.model, tmp_path / "s60.state")
        resumed, _ = _run(engine, list(b"!"), 8, start_state=state)
        whole = list(b"x" * 60) + _run(engine, list(b"x" * 60), 3)[0][:2] + list(b"!")
        assert resumed == [int(t) for t in generate_tokens(lm.model, [whole], 8, Sampling(0.0))]
    finally:
        engine.stop()


def test_gemma_template_renders_turns_and_stops_at_end_of_turn():
    class GemmaLikeTokenizer(ByteTokenizer):
        bos_id = 2

        def encode(self, text):
            return [300] if text == "<end_of_turn>" else list(text.encode())

    t = ChatTemplate(GEMMA_TEMPLATE, GemmaLikeTokenizer(), bos_token="<bos>", eos_token="<eos>")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "More"}]
    assert t.render(messages) == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello"
                                  "<end_of_turn>\n<start_of_turn>user\nMore<end_of_turn>\n<start_of_turn>model\n")
    ids = t.prompt_ids(messages)
    assert ids[0] == 2 and ids.count(2) == 1 and ids.count(300) == 3
    assert 300 in t.stop_ids


def test_default_template_is_used_for_kitelm_checkpoints(tmp_path):
    t = load_chat_template(ByteTokenizer(), tmp_path)
    assert t.origin == "default"
    assert t.render([{"role": "user", "content": "hi"}]) == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    assert t.prompt_ids([{"role": "user", "content": "hi"}])[-17:-14] == [ord("i"), 256, ord("\n")]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert load_chat_template(ByteTokenizer(), tmp_path).render([{"role": "user", "content": "hey"}]) == "hey!"


# ---------------------------------------------------------------------- kitelm chat
@pytest.mark.parametrize("preset", ["griffin-tiny", "transformer-tiny"])
def test_chat_turns_on_kept_state_equal_cold_generation_over_the_whole_history(preset, tmp_path):
    from kitelm.serve.chat import ChatOptions, ChatSession, run_chat

    lm = tiny_lm(preset, max_seq_len=512)
    template = load_chat_template(lm.tokenizer, None)
    engine = Engine(lm.model, lm.tokenizer, max_seqs=1, state_cache_bytes=0).start()
    try:
        session = ChatSession(engine, template, ChatOptions(max_tokens=6, temperature=0.0))
        history = []
        for turn in ("hi", "tell me more", "and then?"):
            reply = session.say(turn)
            history.append({"role": "user", "content": turn})
            cold_ids = template.prompt_ids(history)
            cold = lm.tokenizer.decode(int(t) for t in generate_tokens(lm.model, [cold_ids], 6, Sampling(0.0)))
            assert reply == cold
            history.append({"role": "assistant", "content": reply})
        assert session.last_stats["prompt_tokens"] < len(cold_ids) / 2  # only the new turn was prefilled
        session.save(tmp_path / "conv.state")
        resumed = ChatSession(engine, template, ChatOptions(max_tokens=6, temperature=0.0))
        resumed.load(tmp_path / "conv.state")
        assert resumed.say("last one") == session.say("last one")
        lines = iter(["hello", f"/save {tmp_path / 'cli.state'}", "/reset", "/quit"])
        shown = []
        run_chat(ChatSession(engine, template, ChatOptions(max_tokens=3, temperature=0.0)),
                 lambda _: next(lines), shown.append)
        assert (tmp_path / "cli.state").exists() and "(new conversation)\n" in shown
    finally:
        engine.stop()


def test_engine_stops_at_a_stop_token_and_leaves_it_out_of_the_text():
    lm = tiny_lm("griffin-tiny")
    engine = Engine(lm.model, lm.tokenizer).start()
    try:
        free, _ = _run(engine, list(b"end of turn?"), 12)
        events = []
        done = threading.Event()
        params = GenerationParams(max_tokens=12, temperature=0.0, stop_ids=frozenset({free[4]}))
        engine.submit(Request(list(b"end of turn?"), params, lambda ev: (events.append(ev), ev.kind == "done"
                                                                           and done.set())))
        assert done.wait(300)
        stop_at = free.index(free[4])
        assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == stop_at + 1
        assert "".join(e.text for e in events) == bytes(free[:stop_at]).decode()
    finally:
        engine.stop()


def test_kitelm_serve_command_serves_a_checkpoint(tmp_path):
    import re
    import subprocess
    import sys

    from kitelm.checkpoint import save_checkpoint

    lm = tiny_lm("hawk-tiny")
    folder = save_checkpoint(tmp_path / "run", 1, lm.model.state_dict(), lm.config, lm.tokenizer)
    proc = subprocess.Popen([sys.executable, "-m", "kitelm", "serve", str(folder), "--port", "0", "--model-name",
                             "tiny", "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        line = proc.stdout.readline()  # the banner, printed once the socket listens
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
        assert url, line
        client = openai.OpenAI(base_url=url.group(0), api_key="unused", max_retries=0, timeout=300)
        deadline = time.monotonic() + 60
        while True:
            try:
                r = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert r.choices[0].text == solo(lm, "abc", 5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_admission_by_memory_runs_only_the_sequences_whose_state_fits():
    lm = tiny_lm("griffin-tiny")
    probe = Engine(lm.model, lm.tokenizer)
    engine = Engine(lm.model, lm.tokenizer, max_seqs=16, max_memory=2 * probe.seq_bytes).start()
    try:
        most, done = [0], threading.Semaphore(0)

        def on_event(ev):
            most[0] = max(most[0], len(engine.running))
            if ev.kind == "done":
                done.release()

        for i in range(5):
            engine.submit(Request(list(b"memory %d" % i), GenerationParams(max_tokens=8, temperature=0.0), on_event))
        for _ in range(5):
            assert done.acquire(timeout=300)
        assert most[0] == 2 and engine.reserved == 0
        with pytest.raises(Exception, match="memory budget"):
            engine.submit(Request([1], GenerationParams(max_tokens=1), on_event, n=3))
    finally:
        engine.stop()


def sentencepiece_model(vocab_size: int = 32, **options) -> bytes:
    """A tiny SentencePiece model (Gemma's special ids: pad 0, eos 1, bos 2, unk 3) trained in-test on ten words."""
    import io

    import sentencepiece as spm

    words = ["alpha", "beta", "gamma", "delta", "griffin", "hawk", "state", "window", "token", "scan"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(words[(i + j) % 10] for j in range(8))
                                                          for i in range(200)),
                                   model_writer=buf, vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   minloglevel=2, **options)
    return buf.getvalue()


def test_convert_carries_the_chat_template_to_the_kitelm_checkpoint(tmp_path):
    import shutil

    import kitelm
    from griffin_reference import reference_griffin
    from kitelm.convert import convert

    src = tmp_path / "official"
    src.mkdir()
    torch.save(reference_griffin(window=2048, vocab=97).state_dict(), src / "griffin.pt")
    (src / "tokenizer.model").write_bytes(sentencepiece_model())
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": GEMMA_TEMPLATE, "bos_token": "<bos>",
                                                           "eos_token": "<eos>"}))
    out = convert(src / "griffin.pt", tmp_path / "converted")
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    shutil.rmtree(src)
    lm = kitelm.load(out)
    template = load_chat_template(lm.tokenizer, lm.path)
    assert template.origin.endswith("tokenizer_config.json")
    assert template.render([{"role": "user", "content": "alpha"}]) == \
        "<bos><start_of_turn>user\nalpha<end_of_turn>\n<start_of_turn>model\n"
    ids = template.prompt_ids([{"role": "user", "content": "alpha"}])
    assert ids[0] == lm.tokenizer.bos_id and ids.count(lm.tokenizer.bos_id) == 1


@pytest.mark.parametrize("preset", ["griffin-tiny", "transformer-tiny", "hawk-tiny", "griffin-sas-tiny", "sas-small"])
def test_sequences_joining_and_leaving_the_batch_each_get_their_solo_output(preset):
    """Rows join (written in place or by a rebuild) and leave (the last row moves into the hole) at every step."""
    lm = tiny_lm(preset, max_seq_len=256, **({"width": 64, "n_layers": 2} if preset == "sas-small" else {}))
    engine = Engine(lm.model, lm.tokenizer, max_seqs=3, prefill_chunk=7)
    prompts = [list(b"p%d " % i + b"y" * (11 * i % 30)) for i in range(7)]
    lengths = [5 + 4 * i for i in range(7)]  # different lengths: sequences leave at different steps
    expected = [[int(t) for t in generate_tokens(lm.model, [p], n, Sampling(0.0))] for p, n in zip(prompts, lengths)]
    got: dict[int, list[int]] = {i: [] for i in range(7)}
    done = threading.Semaphore(0)

    def on_event(i):
        def f(ev):
            got[i].extend(ev.token_ids)
            if ev.kind == "done":
                done.release()
        return f

    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.submit(Request(p, GenerationParams(max_tokens=n, temperature=0.0), on_event(i)))
    engine.start()
    try:
        for _ in range(7):
            assert done.acquire(timeout=300)
        assert [got[i] for i in range(7)] == expected
        assert engine.batch.n == 0 and engine.reserved == 0
    finally:
        engine.stop()


# ---------------------------------------------------------------------- incremental detokenizer
def decode_every_prefix(tokenizer, ids: list[int]) -> list[str]:
    """The streamed pieces by decoding every prefix ids[:k] in full (what `LM.stream_ids` did before
    `IncrementalDetokenizer`): the growth of the text at each k where it does not end in U+FFFD."""
    shown, pieces = "", []
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        held = text.endswith("\ufffd")  # an incomplete UTF-8 character
        pieces.append("" if held else text[len(shown):])
        shown = shown if held else text
    return pieces


@pytest.fixture(scope="module")
def tokenizers(corpus_dir):
    """Byte, byte-level BPE (trained on the test corpus, as tests/test_data.py does) and SentencePiece with byte
    fallback (it drops leading spaces): all three split multi-byte characters over tokens."""
    return {"byte": ByteTokenizer(), "bpe": build_tokenizer("bpe:600", load_corpus(str(corpus_dir))),
            "sentencepiece": SentencePieceTokenizer(sentencepiece_model(vocab_size=300, byte_fallback=True,
                                                                        hard_vocab_limit=False))}


@pytest.mark.parametrize("name", ["byte", "bpe", "sentencepiece"])
def test_incremental_detokenizer_equals_decoding_the_whole_ids(tokenizers, name):
    tokenizer, rng = tokenizers[name], random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 80))]
        detokenizer = IncrementalDetokenizer(tokenizer)
        pieces = []
        for tok in ids:
            pieces.append(detokenizer.push([tok]))
            assert "".join(pieces) + detokenizer.pending == tokenizer.decode(ids[:len(pieces)])
        assert pieces == decode_every_prefix(tokenizer, ids)


class CountingByteTokenizer(ByteTokenizer):
    def __init__(self):
        self.decoded = 0  # ids passed to decode, all calls together

    def decode(self, ids) -> str:
        ids = list(ids)
        self.decoded += len(ids)
        return super().decode(ids)


def test_stream_decodes_a_bounded_window_per_step(monkeypatch):
    """`LM.stream_ids` on 2,000 random bytes (no EOS): the pieces of decoding every prefix, for a number of decoded
    ids that grows linearly with the length (decoding every prefix is n²/2 = 2,000,000)."""
    rng = random.Random(0)
    ids = [rng.randrange(256) for _ in range(2000)]
    decoded = {}
    for n in (1000, 2000):
        lm = LM(None, CountingByteTokenizer())
        monkeypatch.setattr(lm, "generate_ids", lambda prompts, **kw: iter(torch.tensor([t]) for t in ids[:n]))
        pieces = [step[0] for step in lm.stream_ids([[0]])]
        decoded[n] = lm.tokenizer.decoded
        assert pieces == decode_every_prefix(ByteTokenizer(), ids[:n])
    assert decoded[2000] <= 8 * 2000 and decoded[2000] <= 2.2 * decoded[1000]


def stream_by_whole_decoding(tokenizer, ids: list[int], params: GenerationParams) -> list[str]:
    """The texts of the engine's events for `ids` by its former `_stream`, which decoded the whole text every token:
    one per token, then the done event's."""
    emitted, texts = 0, []
    for n, tok in enumerate(ids, 1):
        finish = "stop" if tok in params.stop_ids else None
        text = tokenizer.decode([t for t in ids[:n] if t not in params.stop_ids])
        hits = [text.find(stop) for stop in params.stop if stop and stop in text]
        if hits:
            text, finish = text[:min(hits)], "stop"
        safe = len(text)
        if finish is None:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for stop in params.stop:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        texts.append(text[emitted:safe] if safe > emitted else "")
        emitted = max(emitted, safe)
        if finish:
            return texts + [text[emitted:]]
    return texts


def test_engine_stream_equals_decoding_the_whole_text_every_token():
    """Random ids from a few letters, the bytes of "é€" and invalid bytes, against stop strings that overlap,
    hold ASCII or multi-byte characters, and a stop id: the engine sends the same texts at the same tokens."""
    lm = tiny_lm("griffin-tiny")
    engine = Engine(lm.model, lm.tokenizer)
    alphabet = list(b"abc ") + list("é€".encode()) + [0x80, 0xFF]
    stop_sets = [(), ("abc",), ("c a", "bb", ""), ("é€",), ("€ a", "a b c", "\ufffd")]
    rng = random.Random(0)
    for trial in range(200):
        params = GenerationParams(max_tokens=400, stop=stop_sets[trial % len(stop_sets)],
                                  stop_ids=frozenset({0xFF} if trial % 2 else ()))
        ids = [rng.choice(alphabet) for _ in range(rng.randrange(1, 400))]
        events = []
        req = Request([1], params, events.append)
        s = _Seq(req, 0, engine.device, lm.tokenizer)
        for tok in ids:
            s.generated.append(tok)
            s.finish_reason = "stop" if tok in params.stop_ids else None
            engine._stream(s, tok, None)
            if s.finish_reason is not None:
                events.append(engine._done_event(s, None))
                break
        assert [e.text for e in events] == stream_by_whole_decoding(lm.tokenizer, ids, params)
