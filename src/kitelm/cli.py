"""The `kitelm` command line: argument parsing only; every command calls the Python API.

User errors (`KitelmError`) print one line and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from dataclasses import replace

from .errors import KitelmError
from .precision import DTYPES
from .resources import writable_folder

DEFAULT_MODEL = "griffin-mini"
LONG_PROMPT = 8192  # tokens; `generate` announces the prefill of a longer prompt
DTYPE_HELP = ("compute dtype: auto (default) = bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX) or the GPU "
              "supports it, float32 elsewhere")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`kitelm: error: ...`, exit 2) like every other kitelm error."""

    def error(self, message: str):
        self.exit(2, f"kitelm: error: {message} (see `{self.prog} --help`)\n")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
        return value

    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.config import SCHEDULES, TrainConfig

    d = TrainConfig()
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name (default {DEFAULT_MODEL}; see `kitelm presets`)")
    p.add_argument("--config", help="a config.json to use instead of a preset")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override model config fields")
    p.add_argument("--data", help="text file, folder or glob (default: the Python standard library)")
    p.add_argument("--task", help="train on a synthetic task instead of text: selective-copy, induction, phonebook")
    p.add_argument("--tokenizer", default=d.tokenizer, help="byte (default) or bpe:N, e.g. bpe:8192")
    p.add_argument("--out", default=d.out_dir, help=f"run folder (default {d.out_dir})")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in --out, if any) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its checkpoints, "
                   "metrics and plot are deleted); without it a folder holding a run is refused")
    for field in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr_ratio", "warmup_steps",
                  "weight_decay", "grad_clip", "eval_every", "eval_tokens", "save_every", "keep_last", "seed"):
        default = getattr(d, field)
        p.add_argument("--" + field.replace("_", "-"), type=_finite if isinstance(default, float) else int,
                       default=default, help=f"(default {default})")
    p.add_argument("--minutes", type=_positive(float), help="fit --steps to a wall-clock budget for the whole "
                   "command (start-up, training, evaluation, report), from a few timed steps on this machine; the "
                   "schedule spans the fitted steps (default: the fixed --steps, reproducible)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"learning-rate decay after warmup "
                   f"(default {d.schedule})")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help=DTYPE_HELP)
    p.add_argument("--final-eval-tokens", type=int, default=131_072,
                   help="validation tokens for the final bits-per-byte report (default 131072)")
    p.add_argument("--no-sample", action="store_true", help="skip the generated sample at the end")
    p.add_argument("--distributed", choices=("ddp", "fsdp"),
                   help="data-parallel over the torchrun process group (see README: Scaling out)")


def _model_config(args):
    from .config import ModelConfig
    from .presets import get_preset

    config = ModelConfig.load(args.config) if args.config else get_preset(args.model)
    return config.with_overrides(args.set) if args.set else config


def cmd_train(args) -> int:
    from .train import distributed
    from .train.trainer import TrainConfig, Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(out_dir=args.out, **{k: v for k, v in vars(args).items() if k in fields and k != "out_dir"})
    if args.minutes is not None and (args.resume or args.distributed):
        raise KitelmError("--minutes fits the step count of a new run on one process; with --resume or "
                          "--distributed give --steps")
    trainer = Trainer(_model_config(args), tc, resume=args.resume, log=print, progress=True,
                      distributed_mode=args.distributed, overwrite=args.overwrite)
    try:
        if args.minutes is not None:
            _fit_to_minutes(trainer, args)
        return _train_and_report(trainer, args)
    finally:
        trainer.release()
        distributed.cleanup(trainer.dist)


def _fit_to_minutes(trainer, args) -> None:
    """Set the run's steps (and a warmup of at most a tenth of them) from a few timed steps so that the whole command
    fits `--minutes`; says so, or why the budget is too small, before training."""
    from .budget import fit_steps, time_step
    from .evaluation import XZ_CONTEXT_MAX, xz_cache_path

    tc = trainer.tc
    step_s, eval_batch_s = time_step(trainer)
    if tc.task is None:
        final_windows = (len(trainer.data.validation) - 1) // tc.seq_len
        train_text = trainer.corpus.text("train").encode("utf-8", "replace")  # the report compresses it 3×
        uncached = len(train_text) <= XZ_CONTEXT_MAX and not xz_cache_path(train_text).exists()
        xz_bytes = 3 * len(train_text) if uncached else 0
        sample = not args.no_sample
    else:
        final_windows, xz_bytes, sample = 0, 0, False
    elapsed = time.monotonic() - getattr(args, "started", time.monotonic())
    fit = fit_steps(args.minutes, elapsed, step_s, eval_batch_s, eval_every=tc.eval_every,
                    eval_windows=len(trainer.val_windows), final_windows=final_windows, batch_size=tc.batch_size,
                    xz_bytes=xz_bytes, sample=sample)
    trainer.tc = dataclasses.replace(tc, steps=fit.steps, warmup_steps=min(tc.warmup_steps, fit.steps // 10))
    trainer.log(f"--minutes {args.minutes:g}: {fit.steps} steps (one step {fit.step_s:.2f} s on this machine; "
                f"{fit.elapsed_s:.0f} s spent before training, ~{fit.overhead_s:.0f} s of evaluation and report)")


def _train_and_report(trainer, args) -> int:
    from .api import LM
    from .evaluation import WHOLE_SPLIT_MAX_TOKENS, XZ_CONTEXT_MAX, XZ_GIVEN, evaluate_bits_per_byte
    from .precision import dtype_name

    tc, m, say = trainer.tc, trainer.model, trainer.log  # `say` prints on rank 0 only
    say(f"model {trainer.model_config.name}: {m.num_params() / 1e6:.2f}M parameters "
        f"({m.num_params(True) / 1e6:.2f}M non-embedding); data {trainer.data_name} ({trainer.tokenizer.name}); "
        f"{tc.steps} steps × {tc.batch_size * tc.grad_accum} sequences; {dtype_name(trainer.compute_dtype)}")
    result = trainer.train()
    if tc.task is not None:
        from .data.tasks import task_accuracy

        accuracy = task_accuracy(trainer.wrapped, trainer.val_windows, trainer.val_mask)
        say(f"\n{tc.task}: validation loss {result['val_loss']:.4f} nats/answer token, exact-match accuracy "
            f"{100 * accuracy:.1f}% ({len(trainer.val_windows)} samples)\ncheckpoint: {result['checkpoint']}")
        return 0
    train_text = trainer.corpus.text("train").encode("utf-8", "replace")  # xz -9 given it: the compressor's best
    report = evaluate_bits_per_byte(trainer.wrapped, trainer.data.validation, trainer.tokenizer, tc.seq_len,
                                    args.final_eval_tokens, tc.batch_size, trainer.compute_dtype,
                                    context=train_text if len(train_text) <= XZ_CONTEXT_MAX else None,
                                    whole_split=len(trainer.data.validation) <= WHOLE_SPLIT_MAX_TOKENS)
    say("")
    for label, r in (("first", report), ("whole split,", report.get("whole"))):
        if r is not None and (label == "first" or r["bytes"] > report["bytes"]):
            given = f" | xz -9 given the training split {r[XZ_GIVEN]:.3f}" if XZ_GIVEN in r else ""
            say(f"validation, {label} {r['bytes']:,} bytes: loss {r['loss']:.4f} nats/token, {r['bits_per_byte']:.3f} "
                f"bits/byte | gzip -9 {r['gzip -9']:.3f} | xz -9 {r['xz -9']:.3f}{given}")
    say(f"checkpoint: {result['checkpoint']}  ({result['elapsed_s']:.0f} s training)")
    if not args.no_sample and trainer.dist.mode is None:
        lm = LM(m, trainer.tokenizer)
        prompt = "def "
        say(f"\nsample (temperature 0.8, seed {tc.seed}):\n{prompt}"
            + lm.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=50, seed=tc.seed))
    return 0


def cmd_generate(args) -> int:
    from . import load

    lm = load(args.checkpoint, dtype=args.dtype)
    prompts = args.prompt
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    longest = max(len(lm.encode(p)) for p in prompts)  # rejects unencodable prompts before printing anything
    if longest > LONG_PROMPT:  # the library is silent; say why the first token takes a while
        print(f"kitelm: prefilling {longest:,} prompt tokens ...", file=sys.stderr, flush=True)
    if len(prompts) == 1:  # stream a single prompt token by token
        sys.stdout.write(prompts[0])
        for pieces in lm.stream(prompts[0], **kwargs):
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, lm.generate(prompts, **kwargs))):
            print(f"--- [{i}] ---\n{prompt}{text}")
    return 0


def _serve_deps() -> None:
    try:
        import fastapi, jinja2, uvicorn  # noqa: F401, E401
    except ImportError as err:
        raise KitelmError(f"kitelm serve/chat need the 'serve' extra ({err.name} is missing): "
                          "pip install 'kitelm[serve]'") from None


def _load_for_serving(args):
    from . import load

    _serve_deps()
    return load(args.checkpoint, dtype=args.dtype)


def cmd_serve(args) -> int:
    from .serve.app import env_api_key
    from .serve.server import ServeOptions, serve

    lm = _load_for_serving(args)
    options = ServeOptions(host=args.host, port=args.port, model_name=args.model_name,
                           api_key=args.api_key or env_api_key(), max_seqs=args.max_seqs,
                           max_memory=int(args.max_memory * 2**20) if args.max_memory else None,
                           max_queue=args.max_queue, state_cache_bytes=int(args.state_cache_mib * 2**20),
                           prefill_chunk=args.prefill_chunk, chat_template=args.chat_template)
    serve(lm, options)
    return 0


def cmd_chat(args) -> int:
    from .serve.chat import ChatOptions, ChatSession, run_chat
    from .serve.engine import Engine
    from .serve.templates import load_chat_template

    lm = _load_for_serving(args)
    template = load_chat_template(lm.tokenizer, lm.path, args.chat_template)
    engine = Engine(lm.model, lm.tokenizer, max_seqs=1, state_cache_bytes=0).start()
    try:
        session = ChatSession(engine, template, ChatOptions(args.max_tokens, args.temperature, args.top_p,
                                                            args.top_k, args.seed))
        if args.load:
            session.load(args.load)
            print(f"(resumed the conversation in {args.load}: {session.turns} turns)")

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        run_chat(session, input, write)
    finally:
        engine.stop()
    return 0


def cmd_presets(args) -> int:
    from .presets import preset_rows

    print(f"{'preset':<28} {'arch':<12} {'params':>12} {'non-embedding':>14}")
    for row in preset_rows():
        print(f"{row['model']:<28} {row['arch']:<12} {_human(row['params']):>12} "
              f"{_human(row['non_embedding_params']):>14}")
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, data=args.data, out=args.out, extrapolate=args.extrapolate,
                            max_tokens=args.max_tokens, max_windows=args.windows, dtype=args.dtype, log=print)
    if "task" in r:
        print(f"{r['task']}: loss {r['loss']:.4f} nats/answer token, exact-match accuracy {100 * r['accuracy']:.1f}% "
              f"({r['samples']} samples); wrote {r['out']}/eval.json")
        return 0
    print(f"validation ({r['bytes']:,} bytes, context {r['train_len']}): loss {r['loss']:.4f} nats/token, "
          f"{r['bits_per_byte']:.3f} bits/byte | gzip -9 {r['gzip -9']:.3f} | xz -9 {r['xz -9']:.3f}")
    print("loss by position, in multiples of the training length: "
          + ", ".join(f"{k}: {v:.3f}" for k, v in r["loss_by_segment"].items()))
    print(f"wrote {r['out']}/eval.json and loss_by_position.png")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    if args.weights not in (None, "fp32"):  # convert and quantize in one streaming pass
        return cmd_quantize(args)
    out = convert(args.src, args.out, tokenizer=args.tokenizer)
    print(f"wrote kitelm checkpoint {out}")
    return 0


def cmd_export(args) -> int:
    from .convert.export_hf import export_hf
    from .precision import resolve_dtype

    out = export_hf(args.checkpoint, args.out, dtype=resolve_dtype(args.dtype, compute=False))  # stored, not run
    print(f"wrote transformers RecurrentGemmaForCausalLM folder {out}")
    return 0


def _add_weight_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--weights", required=required, choices=("bf16", "int8", "int4") if required else
                   ("fp32", "bf16", "int8", "int4"), help="stored weight format of every Linear layer (norms, biases "
                   "and the RG-LRU stay fp32)")
    p.add_argument("--group-size", type=int, default=-1, help="int8/int4: weights per scale (default: int8 32, int4 "
                   "64; 0 = one scale per output channel, int8 only)")
    p.add_argument("--keep-embedding", action="store_true", help="keep the (tied) embedding/output matrix in fp32")


def cmd_quantize(args) -> int:
    from .quant import QuantSpec, quantize_checkpoint

    spec = QuantSpec(args.weights, args.group_size, embedding=not args.keep_embedding)
    out = quantize_checkpoint(args.src, args.out, spec, tokenizer=args.tokenizer, log=print)
    print(f"wrote {spec.weights} checkpoint {out}")
    return 0


def cmd_study(args) -> int:
    from .experiments.settings import StudyRecipe
    from .experiments.study import results_table, run_block_study

    recipe = StudyRecipe.quick() if args.quick else StudyRecipe()
    recipe = replace(recipe, dtype=args.dtype,
                     **{k: getattr(args, k) for k in ("steps", "seeds") if getattr(args, k) is not None})
    writable_folder(args.out)
    results = run_block_study(args.out, recipe, log=print)
    print(results_table(results))
    print(f"results: {args.out}/results.json, results.md, loss_vs_step.png, loss_vs_time.png")
    return 0


def _reexec_with_allocator_env(args) -> None:
    """Restart the command with `experiments.machine.ALLOCATOR_ENV` (glibc reads it only at start-up) when it came
    from the command line; `main(argv)` called from Python (tests) keeps its process: execve would rerun
    sys.orig_argv."""
    if args.from_command_line:
        from .experiments import machine

        machine.reexec_with_allocator_env()


def cmd_bench(args) -> int:
    from .experiments.bench import EXPERIMENTS, run_bench
    from .experiments.settings import BenchSettings

    writable_folder(args.out)
    _reexec_with_allocator_env(args)
    settings = replace(BenchSettings.quick() if args.quick else BenchSettings(), dtype=args.dtype,
                       peers=not args.no_peers)
    if args.model:  # the decode experiment's models and weight formats
        settings = dataclasses.replace(settings, decode_models=args.model)
    if args.weights:
        settings = dataclasses.replace(settings, decode_weights=args.weights, decode_group_size=args.group_size)
    if args.batches is not None:
        settings = dataclasses.replace(settings, decode_batches=args.batches)
    run_bench(args.experiments or list(EXPERIMENTS), args.out, settings)
    print(f"results: {args.out}/results.md, results.json and PNG plots")
    return 0


def cmd_reproduce(args) -> int:
    from .experiments.reproduce import publish, run_reproduce

    if args.publish:
        folder = publish(args.out, args.publish)
        print(f"published {args.out} into {folder} and the results block of {args.publish}")
        return 0
    writable_folder(args.out)
    _reexec_with_allocator_env(args)
    report = run_reproduce(args.out, args.budget_minutes, dtype=args.dtype)
    print(f"report: {report}")
    return 0


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}" if unit == "B" else f"{n / scale:.2f}{unit}"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    # --debug and --threads are accepted before or after the command (SUPPRESS: a later default never hides them)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    common.add_argument("--threads", type=_positive(int), default=argparse.SUPPRESS,
                        help="torch CPU threads (default: torch's choice)")
    parser = _Parser(prog="kitelm", parents=[common], description="Efficient language models: train, generate, "
                     "benchmark. Run `kitelm train` to train the default model on the Python standard library.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_command = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_command(*a, parents=[common], **kw)  # every command takes the common flags

    p = sub.add_parser("train", help="train a model (default: griffin-mini on the Python standard library)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (batched)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt (default 200)")
    p.add_argument("--temperature", type=_finite, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=_finite, help="nucleus sampling: the smallest set of tokens with probability >= p")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default 0)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="validation loss, bits per byte and loss by position (length extrapolation)")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--data", help="text file, folder or glob (default: the corpus the checkpoint was trained on)")
    p.add_argument("--extrapolate", type=int, default=4, help="loss by position up to this multiple of the "
                   "training length (default 4)")
    p.add_argument("--max-tokens", type=int, default=131_072, help="validation tokens for the loss (default 131072)")
    p.add_argument("--windows", type=int, default=32, help="long windows for the position curve (default 32)")
    p.add_argument("--out", help="folder for eval.json and the plot (default: RUN/eval/step-N for a run's "
                   "checkpoint, else CHECKPOINT-eval beside it)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="convert a RecurrentGemma checkpoint (HF folder or official .pt state dict) "
                       "into a kitelm checkpoint folder")
    p.add_argument("src", help="HF folder (config.json + safetensors) or official PyTorch state-dict file")
    p.add_argument("--out", required=True, help="new checkpoint folder to write")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: the one beside SRC)")
    _add_weight_args(p, required=False)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a Griffin/Hawk/RecurrentGemma checkpoint as a transformers "
                       "RecurrentGemmaForCausalLM folder")
    p.add_argument("checkpoint", help="kitelm run folder or checkpoint folder (full precision)")
    p.add_argument("--format", required=True, choices=("hf",), help="hf: transformers RecurrentGemmaForCausalLM")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored weights (default "
                   "float32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="store a checkpoint's weights as bf16, int8 or int4 (kitelm checkpoint, "
                       "RecurrentGemma HF folder or official state dict; streamed tensor by tensor)")
    p.add_argument("src", help="kitelm run/checkpoint folder, HF folder or official PyTorch state-dict file")
    p.add_argument("--out", required=True, help="new checkpoint folder to write")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model for foreign sources (default: beside SRC)")
    _add_weight_args(p, required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("study", help="train and compare architectures under one recipe (blocks: Pre-LN, Parallel, "
                       "SAS, SAS-P, SAS-P without norm, Griffin, Griffin-SAS)")
    p.add_argument("name", choices=["blocks"], help="which study")
    p.add_argument("--steps", type=int, help="training steps per run (default 1000; 20 with --quick)")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3; 1 with --quick)")
    p.add_argument("--out", default="runs/study-blocks", help="output folder (default runs/study-blocks)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run of the whole study")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("bench", help="measure speed and memory side by side with the installed peers")
    p.add_argument("experiments", nargs="*", help="scan, train, sample, memory, params, decode, serve "
                   "(default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes: about two minutes in all")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP + "; training throughput and MFU use it")
    p.add_argument("--out", default="benchmarks/results/latest", help="results folder")
    p.add_argument("--model", nargs="+", help="decode: presets to measure (default griffin-small), e.g. "
                   "recurrentgemma-2b")
    p.add_argument("--weights", nargs="+", choices=("fp32", "bf16", "int8", "int4"),
                   help="decode: weight formats (default all four)")
    p.add_argument("--group-size", type=int, default=-1, help="decode: int8/int4 group size (default per format)")
    p.add_argument("--batches", type=_positive(int), nargs="*", help="decode: batch sizes of the batched-decode "
                   "rows (default 1 4 8 16; the flag alone: none, e.g. to measure prefill and batch-1 decode only)")
    p.add_argument("--no-peers", action="store_true", help="measure kitelm only, not the installed peers "
                   "(transformers, mamba-ssm, ...)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("reproduce", help="measure the papers' claims on this machine: REPORT.md with a verdict "
                       "per claim (resumable: finished experiments are skipped)")
    p.add_argument("--budget-minutes", type=_positive(float), default=60.0, help="time to scale the experiments to "
                   "(default 60)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.add_argument("--publish", metavar="README", help="run nothing: copy the finished --out run (REPORT.md, "
                   "result.json files, PNGs) into benchmarks/results/reproduce/ beside README and regenerate README's "
                   "block between <!-- reproduce:begin --> and <!-- reproduce:end --> (claims table and plots)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and kept state")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or RecurrentGemma checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default 8000)")
    p.add_argument("--model-name", help="the model id clients name (default: the checkpoint folder's name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $KITELM_API_KEY if set)")
    p.add_argument("--max-seqs", type=_positive(int), default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-memory", type=_positive(float), metavar="MIB",
                   help="inference-state budget of the running sequences in MiB (Griffin/Hawk: a fixed state per "
                   "sequence; transformer: KV of prompt + max_tokens)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--state-cache-mib", type=float, default=256,
                   help="budget of kept states that later requests continue from (default 256 MiB; 0 = off)")
    p.add_argument("--prefill-chunk", type=_positive(int), default=256,
                   help="prompt tokens prefilled per engine step between decode steps (default 256)")
    p.add_argument("--chat-template", help="a Jinja2 chat template file (default: the checkpoint's, else kitelm's)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="interactive chat in the terminal, each turn continuing from the kept state")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or RecurrentGemma checkpoint")
    p.add_argument("--load", help="resume a conversation written by /save")
    p.add_argument("--max-tokens", type=_positive(int), default=512, help="tokens per reply at most (default 512)")
    p.add_argument("--temperature", type=_finite, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=_finite)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat-template", help="a Jinja2 chat template file (default: the checkpoint's, else kitelm's)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.set_defaults(func=cmd_presets)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"kitelm: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2, already printed as one line)
        return int(done.code or 0)
    args.from_command_line = argv is None
    args.started = started
    debug = getattr(args, "debug", False)
    if not debug:
        warnings.showwarning = _one_line_warning
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except KitelmError as err:
        if debug:
            raise
        print(f"kitelm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kitelm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
