"""`mixdpo` command line: train / evaluate / calibrate / personalize / generate / plan / demo (docs/ARCHITECTURE.md
"Public surface").

    mixdpo train --config configs/tiny.yaml model.name_or_path=/tmp/tiny train.max_steps=20
    mixdpo evaluate --run runs/tiny --data tests/data/hh_rlhf_relabeled_sample.jsonl --out runs/tiny/eval.jsonl
    mixdpo calibrate --run runs/tiny --data heldout.jsonl
    mixdpo personalize --run runs/tiny --pairs user.jsonl --user alice
    mixdpo generate --run runs/tiny --prompt "Human: hi\n\nAssistant:" --route sample --max-new-tokens 20
    mixdpo plan --config configs/llama.yaml --world-size 8 deepspeed.config=zero3
    mixdpo demo
    deepspeed --num_gpus 8 $(which mixdpo) train --config configs/llama.yaml     # the launcher adds --local_rank
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

_TRAIN_HELP = """Train a mixture of K DPO experts. Every field of the run config is a flag (below, by section) under its
MixDPOConfig name (TRL / transformers names where they share the concept), a top-level key of the YAML under the
same name, and an a.b=c override under its nested key [in brackets]. Precedence: defaults <- --config YAML <-
flags <- overrides. Values are read as YAML (1e-5, true, null, [1, 2]).

    mixdpo train --model_name_or_path gpt2 --dataset_name prefs.jsonl --num_experts 2 --learning_rate 5e-5
    mixdpo train --config configs/tiny.yaml train.max_steps=20"""


def _add_field_flags(parser: argparse.ArgumentParser) -> None:
    """--<flat name> VALUE for every run-config field, with its help text, grouped by section."""
    from mixdpo_ds.training.trl_config import FLAT

    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (leaf, _) in FLAT.items():
        section = leaf.path.split(".")[0]
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(f"{section} fields"))
        group.add_argument(f"--{name}", dest=f"field:{name}", metavar="VALUE", default=argparse.SUPPRESS,
                           help=_flat_help(name))


def _flat_help(name: str) -> str:
    from mixdpo_ds.training.trl_config import FLAT, flat_help

    return flat_help(FLAT, name).replace("%", "%%")  # argparse formats help with %


def _field_flags(args) -> list[str]:
    return [f"{k.split(':', 1)[1]}={v}" for k, v in vars(args).items() if k.startswith("field:")]


def _train(args) -> int:
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    cfg = load_config(args.config, _field_flags(args) + list(args.overrides))
    trainer = MixDPOTrainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    if os.environ.get("MIXDPO_PRINT_PEAK_RSS"):  # read by benchmarks/bench_plan.py `run_and_measure`
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss    # Linux: KiB
        print(f"MIXDPO_PEAK_RSS rank={os.environ.get('RANK', '0')} kib={kib}", flush=True)
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
    if args.few_shot:
        _few_shot(args, summary["summary_path"])
    return 0


def _few_shot(args, summary_path: str) -> None:
    """`evaluate --few-shot N[,N...]`: the few-shot curve of OUT's rows, into the summary and printed."""
    import json
    from pathlib import Path

    from mixdpo_ds.training.evaluate import score_pairs
    from mixdpo_ds.training.personalize import few_shot_curve, format_curve, run_temperature

    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    dpo = score_pairs(args.dpo_run, args.data, args.group_column, args.batch_size, args.overrides)["rows"] \
        if args.dpo_run else None
    has_cal = (Path(args.run) / "calibration.json").is_file()
    curve = few_shot_curve(rows, [int(n) for n in args.few_shot.split(",")], repeats=args.few_shot_repeats,
                           temperature=run_temperature(args.run) if has_cal else None, dpo_rows=dpo)
    summary = json.loads(Path(summary_path).read_text())
    summary["few_shot"] = curve
    Path(summary_path).write_text(json.dumps(summary, indent=2))
    print(format_curve(curve))


def _calibrate(args) -> int:
    from mixdpo_ds.training.personalize import calibrate

    r = calibrate(args.run, args.data, per_expert=args.per_expert, batch_size=args.batch_size,
                  overrides=args.overrides, by_user=False if args.by_pair else None)
    print(f"temperature {[round(t, 4) for t in r['temperature']]} ({r['likelihood']})  "
          f"ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f}  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}  "
          f"({r['n']} pairs; {r['path']})")
    return 0


def _personalize(args) -> int:
    import json

    from mixdpo_ds.training.personalize import personalize

    result = personalize(args.run, args.pairs, user=args.user, batch_size=args.batch_size)
    for user, entry in result["users"].items():
        print(json.dumps({"user": user, **entry}))
    print(f"{len(result['users'])} user(s) -> {result['store']}")
    return 0


def _generate(args) -> int:
    import json

    from mixdpo_ds.training.generate import generate

    result = generate(args.run, args.prompt, expert=args.expert, route=args.route,
                      max_new_tokens=args.max_new_tokens, user=args.user, seed=args.seed, greedy=args.greedy,
                      user_features=json.loads(args.user_features) if args.user_features else None)
    print(json.dumps(result, ensure_ascii=False))
    return 0


def _plan(args) -> int:
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.plan import format_plan, grid_markdown, plan_memory

    if args.grid:
        print(grid_markdown())
        return 0
    # with a preset the path is only a placeholder (nothing is loaded); the command line's own overrides still win
    placeholder = [f"model.name_or_path={args.model}"] if args.model else []
    cfg = load_config(args.config, placeholder + list(args.overrides))
    try:
        plan = plan_memory(cfg, args.world_size, args.model)
    except OSError as e:  # no config.json there and no hub: say so in one line, not transformers' traceback
        from mixdpo_ds.training.model_shapes import PRESETS

        raise SystemExit(f"mixdpo plan: cannot read the model config of model.name_or_path="
                         f"{cfg.model.name_or_path!r} ({str(e).splitlines()[0]}); give a local model directory or "
                         f"--model with one of {list(PRESETS)}") from None
    print(format_plan(plan))
    return 0


def _demo(args) -> int:
    from mixdpo_ds.apps.demo import main as demo_main  # lazy: written by another module, heavy imports

    return demo_main(args.demo_args) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixdpo", description="Mix-DPO / MoE-DPO on DeepSpeed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a mixture of DPO experts", description=_TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default=None, help="run YAML (configs/*.yaml); without it: the defaults")
    t.add_argument("overrides", nargs="*", help="a.b=c or flat_name=c overrides, applied after the YAML and the "
                                                "flags")
    _add_field_flags(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="per-pair responsibilities, weights, margins and accuracies of a run")
    e.add_argument("--run", required=True, help="run directory (with config.yaml and export/)")
    e.add_argument("--data", required=True, help="preference data file (same forms as data.path)")
    e.add_argument("--out", required=True, help="output JSONL; the summary goes to OUT with .summary.json")
    e.add_argument("--group-column", default=None, help="ground-truth group column (default: the run's)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--few-shot", default=None, metavar="N[,N...]",
                   help="per user: N of their pairs give the posterior weights, accuracy on the rest (needs a user "
                        "column; e.g. 0,1,3,5,10,20); into the summary as few_shot (docs/math.md §13.4)")
    e.add_argument("--few-shot-repeats", type=int, default=5, help="random context draws per user")
    e.add_argument("--dpo-run", default=None, help="a K=1 run to score the same query pairs with (--few-shot)")
    e.add_argument("overrides", nargs="*", help="data.*=value overrides for reading --data (e.g. data.max_length=128)")
    e.set_defaults(func=_evaluate)

    c = sub.add_parser("calibrate", help="fit the margin temperature on held-out pairs (DIR/calibration.json)")
    c.add_argument("--run", required=True, help="run directory (with config.yaml and export/)")
    c.add_argument("--data", required=True, help="held-out preference pairs (not the ones you evaluate on)")
    c.add_argument("--per-expert", action="store_true", help="one temperature per expert instead of one")
    c.add_argument("--by-pair", action="store_true", help="fit the per-pair mixture likelihood even when the pairs "
                                                         "have users (default with users: the per-user evidence)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("overrides", nargs="*", help="data.*=value overrides for reading --data")
    c.set_defaults(func=_calibrate)

    u = sub.add_parser("personalize", help="a user's gate weights from a few of their labelled pairs "
                                           "(DIR/user_weights.json)")
    u.add_argument("--run", required=True, help="run directory (with config.yaml and export/)")
    u.add_argument("--pairs", required=True, help="the user's labelled pairs (same forms as data.path)")
    u.add_argument("--user", default=None, help="the user id (default: every user of the file's user column)")
    u.add_argument("--batch-size", type=int, default=8)
    u.set_defaults(func=_personalize)

    g = sub.add_parser("generate", help="sample from the mixture, the top-1 expert or a fixed expert")
    g.add_argument("--run", required=True)
    g.add_argument("--prompt", required=True)
    how = g.add_mutually_exclusive_group()
    how.add_argument("--expert", type=int, default=None, help="decode from this expert")
    how.add_argument("--route", choices=("top1", "sample"), default="sample",
                     help="sample: z ~ w(x) then decode from π_z (exact mixture sampling); top1: argmax w(x)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--user", default=None, help="user id: of the run's user-weight store (mixdpo personalize), or "
                                                "of the training data for a user-conditioned gate")
    g.add_argument("--user-features", default=None, metavar="JSON",
                   help="a new user's features for a gate on user features, e.g. '{\"pool\": \"b\"}'")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--greedy", action="store_true", help="greedy decoding from the chosen expert")
    g.set_defaults(func=_generate)

    m = sub.add_parser("plan", help="estimated bytes per rank of a run config (docs/scaling.md)")
    m.add_argument("--config", default=None, help="run YAML (configs/*.yaml); without it: the defaults")
    m.add_argument("--world-size", type=int, default=1, help="ranks (data-parallel world size)")
    m.add_argument("--model", default=None, metavar="PRESET", help="shapes of a built-in preset (llama-3-8b, "
                   "llama-3-70b, gpt2, ...) instead of model.name_or_path's config.json")
    m.add_argument("--grid", action="store_true", help="print the docs/scaling.md table (Llama-3 8B / 70B grid)")
    m.add_argument("overrides", nargs="*", help="a.b=c overrides, applied after the YAML")
    m.set_defaults(func=_plan)

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
