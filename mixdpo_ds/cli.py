"""`mixdpo` command line: train / evaluate / generate / demo (docs/ARCHITECTURE.md "Public surface").

    mixdpo train --config configs/tiny.yaml model.name_or_path=/tmp/tiny train.max_steps=20
    mixdpo evaluate --run runs/tiny --data tests/data/hh_rlhf_relabeled_sample.jsonl --out runs/tiny/eval.jsonl
    mixdpo generate --run runs/tiny --prompt "Human: hi\n\nAssistant:" --route sample --max-new-tokens 20
    mixdpo demo
    deepspeed --num_gpus 8 $(which mixdpo) train --config configs/llama.yaml     # the launcher adds --local_rank
"""
from __future__ import annotations

import argparse
import logging
import sys


def _train(args) -> int:
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    cfg = load_config(args.config, args.overrides)
    trainer = MixDPOTrainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return 0


def _evaluate(args) -> int:
    from mixdpo_ds.training.evaluate import NonFiniteError, evaluate_run

    try:
        summary = evaluate_run(args.run, args.data, args.out, group_column=args.group_column,
                               batch_size=args.batch_size, overrides=args.overrides)
    except NonFiniteError as e:  # the files are written; the accuracies in them are not to be trusted
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"accuracy {summary['accuracy']:.4f}  summary: {summary['summary_path']}")
    return 0


def _generate(args) -> int:
    import json

    from mixdpo_ds.training.generate import generate

    result = generate(args.run, args.prompt, expert=args.expert, route=args.route,
                      max_new_tokens=args.max_new_tokens, user=args.user, seed=args.seed, greedy=args.greedy)
    print(json.dumps(result, ensure_ascii=False))
    return 0


def _demo(args) -> int:
    from mixdpo_ds.apps.demo import main as demo_main  # lazy: written by another module, heavy imports

    return demo_main(args.demo_args) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixdpo", description="Mix-DPO / MoE-DPO on DeepSpeed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a mixture of DPO experts")
    t.add_argument("--config", required=True, help="run YAML (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="a.b=c overrides, applied after the YAML")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="per-pair responsibilities, weights, margins and accuracies of a run")
    e.add_argument("--run", required=True, help="run directory (with config.yaml and export/)")
    e.add_argument("--data", required=True, help="preference data file (same forms as data.path)")
    e.add_argument("--out", required=True, help="output JSONL; the summary goes to OUT with .summary.json")
    e.add_argument("--group-column", default=None, help="ground-truth group column (default: the run's)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("overrides", nargs="*", help="data.*=value overrides for reading --data (e.g. data.max_length=128)")
    e.set_defaults(func=_evaluate)

    g = sub.add_parser("generate", help="sample from the mixture, the top-1 expert or a fixed expert")
    g.add_argument("--run", required=True)
    g.add_argument("--prompt", required=True)
    how = g.add_mutually_exclusive_group()
    how.add_argument("--expert", type=int, default=None, help="decode from this expert")
    how.add_argument("--route", choices=("top1", "sample"), default="sample",
                     help="sample: z ~ w(x) then decode from π_z (exact mixture sampling); top1: argmax w(x)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--user", default=None, help="user id for a user-conditioned gate")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--greedy", action="store_true", help="greedy decoding from the chosen expert")
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="the embedded default run (mixdpo_ds.apps.demo)",
                       add_help=False)  # `mixdpo demo --help` shows the demo's own options
    d.add_argument("demo_args", nargs=argparse.REMAINDER)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":  # everything after `demo` belongs to the demo's own parser
        args.demo_args = unknown + list(args.demo_args)
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
