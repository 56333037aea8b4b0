"""Ablations of Mix-DPO / MoE-DPO on the demo's synthetic review tasks, through the real trainer.

    python benchmarks/bench_ablations.py --ablation correction      # posterior correction c = 0 vs 1
    python benchmarks/bench_ablations.py --ablation em              # exact E-step vs Gumbel-softmax relaxation
    python benchmarks/bench_ablations.py --ablation K               # K = 2 / 3 / 4 heads
    python benchmarks/bench_ablations.py --ablation symmetry        # none / init noise / random warm-up / both
    python benchmarks/bench_ablations.py --ablation gate            # MoE gate: pretrained frozen / pretrained
                                                                    #   learnable / learnable from scratch
    python benchmarks/bench_ablations.py --ablation all --seeds 2 --steps 250

Each variant trains on the same data and SFT base as the demo (`mixdpo_ds.apps.demo` pieces, one CPU thread, one
process) and is evaluated on held-out pairs: mixture accuracy, the group-matched expert's accuracy ("routed"),
best-permutation recovery of argmax q, gate routing accuracy (MoE). The baseline row of every table is DPO (K=1)
measured in the same run. The table is appended to benchmarks/RESULTS.md with machine, commit, date and command
(append only: other benchmarks write there too).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, read_jsonl, write_task
from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
from mixdpo_ds.apps.demo import DemoConfig, _quiet, held_out_metrics, train_and_evaluate
from mixdpo_ds.apps.report import fmt
from mixdpo_ds.apps.sft import SFTConfig, build_tiny_base

PRETRAIN = {"pretrain_steps": 1000, "pretrain_label_column": "group"}  # the demo's gate_pretrain_steps
# name -> list of (variant, task, K, gate kind, run-config overrides)
ABLATIONS = {
    "correction": [("c = 1 (eq. 11 with q^(r))", "multi", 3, "mix", {"em": {"posterior_correction": 1}}),
                   ("c = 0 (plain DPO margin)", "multi", 3, "mix", {"em": {"posterior_correction": 0}})],
    "em": [("exact E-step", "multi", 3, "mix", {"em": {"mode": "exact"}}),
           ("gumbel, posterior logits, τ 1 → 0.5", "multi", 3, "mix",
            {"em": {"mode": "gumbel", "tau_anneal_steps": 200, "gumbel": {"logits": "posterior"}}}),
           ("gumbel, prior logits", "multi", 3, "mix", {"em": {"mode": "gumbel", "gumbel": {"logits": "prior"}}})],
    "K": [(f"K = {k}", "multi", k, "mix", {}) for k in (2, 3, 4)],
    "symmetry": [("none (noise 0, no warm-up)", "multi", 3, "mix", {"experts": {"init_noise": 0.0}}),
                 ("init_noise 0.1", "multi", 3, "mix", {"experts": {"init_noise": 0.1}}),
                 ("warm-up 20 random-q steps", "multi", 3, "mix",
                  {"experts": {"init_noise": 0.0}, "em": {"warmup_random_steps": 20}}),
                 ("both", "multi", 3, "mix", {"experts": {"init_noise": 0.1}, "em": {"warmup_random_steps": 20}})],
    "gate": [("pretrained on domain, frozen", "contextual", 2, "moe", {"em": {"gate_update": "frozen"},
                                                                     "gate": PRETRAIN}),
             ("pretrained on domain, learnable (joint)", "contextual", 2, "moe",
              {"em": {"gate_update": "joint", "lambda_global": 1.0}, "gate": PRETRAIN}),
             ("learnable from scratch (joint)", "contextual", 2, "moe",
              {"em": {"gate_update": "joint", "lambda_global": 1.0}})],
}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def prepare_seed(cfg: DemoConfig, seed: int, root: str, tokenizer) -> tuple[str, dict]:
    """Data of both tasks + the SFT base for one seed (as the demo builds them)."""
    n_train = {"multi": cfg.num_train, "contextual": cfg.num_train_contextual}
    paths = {t: write_task(ReviewsConfig(task=t, num_train=n_train[t], num_test=cfg.num_test,
                                         num_sft=cfg.num_sft, seed=seed), os.path.join(root, f"s{seed}", t))
             for t in ("multi", "contextual")}
    rows = read_jsonl(paths["multi"]["sft"]) + read_jsonl(paths["contextual"]["sft"])
    base, _ = build_tiny_base(os.path.join(root, f"s{seed}", "sft"), tokenizer, rows,
                              SFTConfig(steps=cfg.sft_steps, seed=seed), n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                              seed=seed)
    return base, paths


def run_ablation(name: str, cfg: DemoConfig, seeds: int, root: str, tokenizer, bases: dict) -> list[str]:
    variants = ABLATIONS[name]
    task = variants[0][1]
    groups = ReviewsConfig(task=task).groups()
    rows = [("DPO (K=1), baseline", task, 1, "mix", {})] + variants
    results = {v[0]: [] for v in rows}
    for seed in range(seeds):
        base, paths = bases[seed]
        for label, _, K, gate, over in rows:
            t0 = time.perf_counter()
            res = train_and_evaluate(cfg, base, paths[task], os.path.join(root, f"s{seed}", name, str(hash(label))),
                                     K, gate, seed, groups, over, task)
            m = held_out_metrics(res["rows"], groups, K)
            m["seconds"] = time.perf_counter() - t0
            results[label].append(m)
            print(f"[{name}] seed {seed} {label}: acc {m['mixture']['all']:.3f} routed {m['routed']['all']:.3f} "
                  f"recovery {m['recovery']:.3f} gate {m['gate_routing']:.3f} ({m['seconds']:.1f}s)", flush=True)
    header = ["variant", "held-out acc (mixture)", *(f"routed {g}" for g in groups), "recovery", "gate routing",
              "s / run"]
    lines = [f"#### {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, ms in results.items():
        cells = [label, fmt([m["mixture"]["all"] for m in ms]),
                 *(fmt([m["routed"].get(g, float("nan")) for m in ms]) for g in groups),
                 fmt([m["recovery"] for m in ms]), fmt([m["gate_routing"] for m in ms]),
                 f"{sum(m['seconds'] for m in ms) / len(ms):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ablation", choices=[*ABLATIONS, "all"], default="all")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's)")
    p.add_argument("--fast", action="store_true", help="the demo's --fast sizes")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    p.add_argument("--no-append", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    cfg = DemoConfig(fast=a.fast, progress_bar=False)
    if a.steps:
        cfg.steps = cfg.ctx_steps = a.steps
    names = list(ABLATIONS) if a.ablation == "all" else [a.ablation]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixdpo_ablations_") as root:
        tokenizer = build_review_tokenizer(os.path.join(root, "tok"))
        bases = {s: prepare_seed(cfg, s, root, tokenizer) for s in range(a.seeds)}
        tables = [line for n in names for line in run_ablation(n, cfg, a.seeds, root, tokenizer, bases) + [""]]
    cmd = "python benchmarks/bench_ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = [f"### Ablations on the synthetic review tasks ({a.seeds} seed(s), mean ± sd)", "",
            f"machine: {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPU, "
            f"torch {torch.__version__}, 1 thread); commit {_commit()}; date "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; command `{cmd}`; the demo's budgets: "
            f"multi-reward runs {cfg.steps} steps × {cfg.batch_size} pairs ({cfg.num_train} training pairs), "
            f"contextual runs {cfg.ctx_steps} × {cfg.ctx_batch_size} ({cfg.num_train_contextual}); lr {cfg.lr}, "
            f"β {cfg.beta}; total {time.perf_counter() - t0:.0f} s.", ""]
    text = "\n".join(head + tables)
    print(text)
    if not a.no_append:
        with open(a.results, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
