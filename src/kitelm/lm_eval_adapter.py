"""lm-evaluation-harness adapter: any kitelm checkpoint as the lm-eval model `kitelm` (optional extra `eval`).

    pip install 'kitelm[eval]'
    python -c "import kitelm.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()" \\
        --model kitelm --model_args pretrained=runs/default --tasks lambada_openai

or from Python: `lm_eval.simple_evaluate(model=KitelmLM(pretrained="runs/default"), tasks=[...])`. Importing this
module registers the class under the name `kitelm` (`lm_eval.api.registry.register_model`).

Scoring. A request (context c, continuation x) is tokenised as lm-eval's HF backend does: trailing spaces of c move to
x, ids(c + x) = ctx ‖ cont with ctx = `LM.encode(c)` (BOS first when the tokenizer has one). An empty ctx becomes the
prefix token (BOS, or else EOS, the document separator the model was trained on). With `inp = (ctx ‖ cont)[:-1]`
truncated on the left to `max_length` tokens,

    log p(x | c) = Σ_{j<|cont|} log softmax(logits[|inp| − |cont| + j])[cont_j],

and is_greedy says whether every cont_j is the argmax there. Requests are sorted by length and right-padded into
batches of `batch_size` (causal models: padding after a row never changes its logits). `loglikelihood_rolling` cuts a
document into disjoint windows of at most `max_length` predicted tokens (lm-eval's `get_rolling_token_windows`,
context 1) and sums their log-likelihoods. `generate_until` decodes greedily (or samples, seed 0, when `do_sample`
is set: `temperature` (default 1), `top_k`, `top_p`), batched per identical generation arguments, until every row has
produced EOS or one of the `until` strings or `max_gen_toks` tokens; the text is cut before the first stop string.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .api import LM as KitelmModel, load
from .errors import KitelmError


@register_model("kitelm")
class KitelmLM(LM):
    """lm-eval `LM` over a kitelm checkpoint (`pretrained`: run folder, checkpoint folder or RecurrentGemma checkpoint)
    or over an already loaded `kitelm.LM` (`lm`)."""

    def __init__(self, pretrained: str | Path | None = None, lm: KitelmModel | None = None, device: str | None = None,
                 batch_size: int | str | None = 16, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, dtype: str | None = None) -> None:
        super().__init__()
        if (pretrained is None) == (lm is None):
            raise KitelmError("the kitelm lm-eval model needs exactly one of pretrained=CHECKPOINT or lm=<kitelm.LM>")
        if lm is None:
            lm = load(pretrained, device=device or "cpu", dtype=getattr(torch, dtype) if dtype else None)
        self.lm = lm
        self._device = next(lm.model.parameters()).device
        # lm-eval passes "auto" or "auto:N" when asked to find the largest batch; a fixed size is as good on CPU
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else int(max_batch_size or 16)
        self.max_length = int(max_length or lm.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        start = lm.encode("")
        self.prefix_id = start[0] if start else lm.tokenizer.eos_id

    # ------------------------------------------------------------------ tokens
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.lm.encode(context)
        whole = self.lm.encode(context + continuation)
        cont = whole[len(ctx):]
        return ctx or [self.prefix_id], cont

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) → (Σ log p(continuation), greedy?), batched longest first."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        self.lm.model.eval()
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="kitelm loglikelihood"):
            rows = order[start: start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in rows]
            batch = torch.zeros(len(rows), max(map(len, inputs)), dtype=torch.long)
            for r, ids in enumerate(inputs):
                batch[r, :len(ids)] = torch.tensor(ids)
            logits = self.lm.model(batch.to(self._device))  # [B, T, V]
            for r, (i, ids) in enumerate(zip(rows, inputs)):
                cont = pairs[i][1]
                if not cont:
                    continue
                logp = F.log_softmax(logits[r, len(ids) - len(cont): len(ids)].float(), -1)  # [|cont|, V]
                target = torch.tensor(cont, device=logp.device)
                out[i] = (logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
        return out

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self._score([self._encode_pair(*req.args) for req in requests], disable_tqdm)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            ids = self.lm.tokenizer.encode(req.args[0])
            for pair in get_rolling_token_windows(ids, self.prefix_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(pair))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(windows, disable_tqdm)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="kitelm generate_until")
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
            keep = max(1, self.max_length - max_new)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                prompts = [self.lm.encode(requests[i].args[0])[-keep:] or [self.prefix_id] for i in chunk]
                for i, text in zip(chunk, self._generate(prompts, until, max_new, temperature,
                                                         kwargs.get("top_k"), kwargs.get("top_p"))):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def _generate(self, prompts: list[list[int]], until: list[str], max_new: int, temperature: float,
                  top_k: int | None, top_p: float | None) -> list[str]:
        """Decode `prompts` together (`kitelm.LM.stream_ids`); each text stops before its first `until` string or at
        EOS. A row's text held no stop string s before its new piece, so only the end where the piece may complete
        one, from character len(text) - len(piece) - len(s) + 1 on, is searched."""
        texts, stopped = [""] * len(prompts), [False] * len(prompts)
        for pieces in self.lm.stream_ids(prompts, max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=0):
            for r, piece in enumerate(pieces):
                if not stopped[r]:
                    texts[r] += piece
                    end = len(texts[r]) - len(piece) + 1
                    stopped[r] = any(s in texts[r][max(end - len(s), 0):] for s in until)
            if all(stopped):
                break
        for r, text in enumerate(texts):
            cuts = [text.index(s) for s in until if s in text]
            texts[r] = text[:min(cuts)] if cuts else text
        return texts
