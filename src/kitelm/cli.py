"""The `kitelm` command line: argument parsing only; every command calls the Python API.

User errors (`KitelmError`) print one line and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .errors import KitelmError

DEFAULT_MODEL = "transformer-small"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.trainer import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name (default {DEFAULT_MODEL}; see `kitelm presets`)")
    p.add_argument("--config", help="a config.json to use instead of a preset")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override model config fields")
    p.add_argument("--data", help="text file, folder or glob (default: the Python standard library)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="byte (default) or bpe:N, e.g. bpe:8192")
    p.add_argument("--out", default=d.out_dir, help=f"run folder (default {d.out_dir})")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in --out, if any) or a checkpoint folder")
    for field in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "schedule",
                  "weight_decay", "grad_clip", "eval_every", "eval_tokens", "save_every", "keep_last", "seed"):
        default = getattr(d, field)
        p.add_argument("--" + field.replace("_", "-"), type=type(default), default=default,
                       help=f"(default {default})")
    p.add_argument("--final-eval-tokens", type=int, default=131_072,
                   help="validation tokens for the final bits-per-byte report (default 131072)")
    p.add_argument("--no-sample", action="store_true", help="skip the generated sample at the end")


def _model_config(args):
    from .config import ModelConfig, get_preset

    config = ModelConfig.load(args.config) if args.config else get_preset(args.model)
    return config.with_overrides(args.set) if args.set else config


def cmd_train(args) -> int:
    from .api import LM
    from .evaluation import evaluate_bits_per_byte
    from .train.trainer import TrainConfig, Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(out_dir=args.out, data=args.data, **{k: v for k, v in vars(args).items()
                                                          if k in fields and k not in ("out_dir", "data")})
    trainer = Trainer(_model_config(args), tc, resume=args.resume, log=print, progress=True)
    m = trainer.model
    print(f"model {trainer.model_config.name}: {m.num_params() / 1e6:.2f}M parameters "
          f"({m.num_params(True) / 1e6:.2f}M non-embedding); corpus {trainer.corpus.name}: "
          f"{len(trainer.data.train):,} train / {len(trainer.data.validation):,} validation tokens "
          f"({trainer.tokenizer.name}); {tc.steps} steps × {tc.tokens_per_step:,} tokens")
    result = trainer.train()
    report = evaluate_bits_per_byte(m, trainer.data.validation, trainer.tokenizer, tc.seq_len, args.final_eval_tokens,
                                    tc.batch_size)
    print(f"\nvalidation ({report['bytes']:,} bytes): loss {report['loss']:.4f} nats/token, "
          f"{report['bits_per_byte']:.3f} bits/byte | gzip -9 {report['gzip -9']:.3f} | xz -9 {report['xz -9']:.3f}")
    print(f"checkpoint: {result['checkpoint']}  ({result['elapsed_s']:.0f} s training)")
    if not args.no_sample:
        lm = LM(m, trainer.tokenizer)
        prompt = "def "
        print(f"\nsample (temperature 0.8, seed {tc.seed}):\n{prompt}", end="")
        print(lm.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=50, seed=tc.seed))
    return 0


def cmd_generate(args) -> int:
    from . import load

    lm = load(args.checkpoint)
    prompts = args.prompt
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt in prompts:  # reject prompts the tokenizer cannot encode before printing anything
        lm.encode(prompt)
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


def cmd_presets(args) -> int:
    from .config import list_presets
    from .models import build_model

    rows = []
    for config in list_presets():
        model = build_model(config, device="meta")
        rows.append((config.name, config.arch, model.num_params(), model.num_params(True)))
    print(f"{'preset':<28} {'arch':<12} {'params':>12} {'non-embedding':>14}")
    for name, arch, total, non_emb in rows:
        print(f"{name:<28} {arch:<12} {_human(total):>12} {_human(non_emb):>14}")
    return 0


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}" if unit == "B" else f"{n / scale:.2f}{unit}"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kitelm", description="Efficient language models: train, generate, "
                                     "benchmark. Run `kitelm train` to train the default model on the Python "
                                     "standard library.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: transformer-small on the Python standard library)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (batched)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except KitelmError as err:
        if args.debug:
            raise
        print(f"kitelm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kitelm: interrupted", file=sys.stderr)
        return 130
