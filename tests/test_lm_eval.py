"""The lm-evaluation-harness adapter (optional extra `eval`): its three methods on a tiny trained checkpoint, checked
against the model's own logits and generation, and a local lm-eval task run end to end, offline."""

from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kitelm[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from kitelm import load  # noqa: E402
from kitelm.presets import get_preset  # noqa: E402
from kitelm.lm_eval_adapter import KitelmLM  # noqa: E402
from kitelm.train.trainer import TrainConfig, Trainer  # noqa: E402
from numerics import fp32_tolerance, model_reductions


@pytest.fixture(scope="module")
def checkpoint(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval-run")
    tc = TrainConfig(out_dir=str(out), data=str(corpus_dir), steps=6, batch_size=4, seq_len=32, eval_every=6,
                     save_every=6, eval_tokens=256, warmup_steps=1)
    Trainer(get_preset("transformer-tiny"), tc).train()
    return out


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _sum_tolerance(lm, total: float) -> float:
    """A sum of per-token log-probabilities: each is the model's fp32 output, the sum adds one more reduction
    (tests/numerics.py); relative to the sum's magnitude."""
    terms, depth = model_reductions(lm.config, 256)
    return fp32_tolerance(terms, depth + 1) * max(abs(total), 1.0)


def _manual_logprob(lm, context: str, continuation: str) -> float:
    ctx = lm.encode(context) or [lm.tokenizer.eos_id]
    ids = ctx + lm.encode(continuation)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]])).float(), -1)[0]
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))


def test_loglikelihood_matches_the_model_and_batching_changes_nothing(checkpoint):
    lm = load(checkpoint)
    pairs = [("def alpha(", "value):"), ("", "return"), ("x = 1", "\ny = 2"), ("for item in", " items:\n")]
    batched = KitelmLM(lm=lm, batch_size=3).loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    alone = KitelmLM(lm=lm, batch_size=1).loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logp, _), (logp_alone, _) in zip(pairs, batched, alone):
        expected = _manual_logprob(lm, context, continuation)
        assert logp == pytest.approx(expected, abs=_sum_tolerance(lm, expected))
        assert logp == pytest.approx(logp_alone, abs=_sum_tolerance(lm, expected))
    greedy = lm.generate("def", max_new_tokens=4, temperature=0)
    (_, is_greedy), = KitelmLM(lm=lm).loglikelihood(_requests("loglikelihood", [("def", greedy)]), True)
    assert is_greedy


def test_loglikelihood_rolling_scores_every_token_once(checkpoint):
    lm = load(checkpoint)
    text = "def gamma(value, items=None):\n    return value * 3\n"
    full, = KitelmLM(lm=lm, max_length=256).loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    expected = _manual_logprob(lm, "", text)
    assert full == pytest.approx(expected, abs=_sum_tolerance(lm, expected))
    windowed, = KitelmLM(lm=lm, max_length=8).loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    assert math.isfinite(windowed) and windowed < 0 and windowed != pytest.approx(full, abs=1e-6)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(checkpoint):
    lm = load(checkpoint)
    prompts = ["def alpha(", "    return "]
    kwargs = {"until": ["\n"], "max_gen_toks": 12}
    got = KitelmLM(lm=lm).generate_until(_requests("generate_until", [(p, kwargs) for p in prompts]), True)
    for prompt, text in zip(prompts, got):
        full = lm.generate(prompt, max_new_tokens=12, temperature=0)
        assert "\n" not in text and full.startswith(text) and full.split("\n")[0] == text


def test_local_tasks_run_through_simple_evaluate_by_registered_name(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"prefix": "def alpha(", "choices": ["value):", "!!@@"], "label": 0, "text": "x = 1\n"},
            {"prefix": "    return ", "choices": ["##$$", "value"], "label": 1, "text": "for item in items:\n"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              f"  cache_dir: {tmp_path / 'hf-cache'}\ntest_split: test\n")
    (tmp_path / "choice.yaml").write_text(
        "task: kitelm_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{prefix}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "rolling.yaml").write_text(
        "task: kitelm_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    (tmp_path / "generate.yaml").write_text(
        "task: kitelm_generate\n" + common + "output_type: generate_until\ndoc_to_text: '{{prefix}}'\n"
        "doc_to_target: '{{choices[label]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model="kitelm", model_args={"pretrained": str(checkpoint)}, batch_size=2,
                              tasks=["kitelm_choice", "kitelm_rolling", "kitelm_generate"],
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                              bootstrap_iters=0, log_samples=False)["results"]
    assert 0 <= results["kitelm_choice"]["acc,none"] <= 1
    assert 0 < results["kitelm_rolling"]["bits_per_byte,none"] < 20
    assert 0 <= results["kitelm_generate"]["exact_match,none"] <= 1
