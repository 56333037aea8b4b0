"""Recovery of three pairwise-conflicting annotator groups from rankings vs from pairs (docs/math.md §15).

    python benchmarks/bench_rankings.py                          # m = 3 and 4, 3 seeds, appends to RESULTS.md
    python benchmarks/bench_rankings.py --m 3 --seeds 2 --steps 100 --no-append

Data: `mixdpo_ds.apps.datasets.rankings` — three groups rank each item's m responses by their own rule, laid out so
that every pair of responses is split 2-vs-1 between the rules. Two runs per seed and m, through the real trainer
with the demo's settings (K = 3 heads on a frozen SFT trunk, Mix-DPO gate, exact EM, the same steps, items per step
and lr): *ranked* trains on the rankings (Plackett–Luce, m·B rows per batch), *pairwise* (the baseline, measured in
the same run) on the same items as one random pair each, ordered by the item's group. Both are evaluated on the same
held-out items:

    recovery (ranked test)   best-permutation accuracy of argmax q given the held-out *rankings*
    recovery (pairs test)    the same given one held-out pair per item (the information a pair carries)
    matched expert rule acc  each group's matched expert (mapping of the ranked-test recovery), its accuracy on all
                             m(m−1)/2 pairs of its own group's held-out items (1 = the expert has the rule)

One CPU thread, one process. The table is appended to benchmarks/RESULTS.md with machine, commit, date, command.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from bench_scaling import commit

from mixdpo_ds.apps.datasets.rankings import GROUPS, RankedReviewsConfig, write_ranked_task
from mixdpo_ds.apps.datasets.reviews import read_jsonl
from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
from mixdpo_ds.apps.demo import DemoConfig, _quiet, run_config
from mixdpo_ds.apps.report import fmt
from mixdpo_ds.apps.sft import SFTConfig, build_tiny_base

K = 3


def train(cfg: DemoConfig, base: str, train_path: str, run_dir: str, seed: int) -> None:
    from mixdpo_ds.training.trainer import MixDPOTrainer

    trainer = MixDPOTrainer(run_config(cfg, base, train_path, run_dir, K, "mix", seed))
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()


def evaluate(run_dir: str, paths: dict) -> dict:
    """The three numbers of the table for one trained run."""
    from mixdpo_ds.training.evaluate import evaluate_run, recovery_accuracy

    rows = {}
    for split in ("test_ranked", "test_pairs", "test_allpairs"):
        out = os.path.join(run_dir, f"eval_{split}.jsonl")
        evaluate_run(run_dir, paths[split], out, batch_size=100)
        rows[split] = read_jsonl(out)
    rec = {s: recovery_accuracy([r["expert"] for r in rows[s]], [GROUPS.index(r["group"]) for r in rows[s]], K,
                                len(GROUPS)) for s in ("test_ranked", "test_pairs")}
    mapping = rec["test_ranked"]["mapping"]  # group id -> expert
    pairs = rows["test_allpairs"]
    rule = [np.mean([r["margins"][mapping[g]] > 0 for r in pairs if r["group"] == name])
            for g, name in enumerate(GROUPS) if g in mapping]
    return {"rec_ranked": rec["test_ranked"]["accuracy"], "rec_pairs": rec["test_pairs"]["accuracy"],
            "rule": float(np.mean(rule)), "rule_min": float(np.min(rule))}


def run_seed(m: int, seed: int, a, root: str, tokenizer) -> dict[str, dict]:
    d = os.path.join(root, f"m{m}_s{seed}")
    paths = write_ranked_task(RankedReviewsConfig(num_items=a.items, num_test=a.test, m=m, seed=seed), d)
    sft_rows = [{"prompt": r["prompt"], "response": y} for r in read_jsonl(paths["train_ranked"])[:a.sft_rows]
                for y in r["responses"]]
    base, _ = build_tiny_base(os.path.join(d, "sft"), tokenizer, sft_rows, SFTConfig(steps=a.sft_steps, seed=seed),
                              seed=seed)
    cfg = DemoConfig(steps=a.steps, batch_size=a.batch, progress_bar=False)
    out = {}
    for name, train_path in (("pairwise", paths["train_pairs"]), ("ranked", paths["train_ranked"])):
        t0 = time.perf_counter()
        train(cfg, base, train_path, os.path.join(d, name), seed)
        out[name] = {**evaluate(os.path.join(d, name), paths), "seconds": time.perf_counter() - t0}
        r = out[name]
        print(f"[m={m} seed {seed}] {name}: recovery ranked-test {r['rec_ranked']:.3f} pairs-test "
              f"{r['rec_pairs']:.3f} matched-expert rule acc {r['rule']:.3f} (min {r['rule_min']:.3f}) "
              f"({r['seconds']:.0f}s)", flush=True)
    return out


def table(results: dict[int, list[dict]]) -> list[str]:
    header = ["m", "training data", "recovery, ranked test (mean ± sd)", "worst seed", "recovery, pairs test",
              "matched expert rule acc", "worst group", "ratio ranked/pairwise recovery", "s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, seeds in results.items():
        base = np.array([s["pairwise"]["rec_ranked"] for s in seeds])
        for name in ("pairwise", "ranked"):
            rs = [s[name] for s in seeds]
            rec = np.array([r["rec_ranked"] for r in rs])
            lines.append("| " + " | ".join([
                str(m), name + (" (baseline)" if name == "pairwise" else ""), fmt(rec), f"{rec.min():.3f}",
                fmt([r["rec_pairs"] for r in rs]), fmt([r["rule"] for r in rs]),
                f"{min(r['rule_min'] for r in rs):.3f}", fmt(rec / base),
                f"{np.mean([r['seconds'] for r in rs]):.0f}"]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[3, 4], help="responses per item (3 and/or 4)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--items", type=int, default=4000, help="training items")
    p.add_argument("--test", type=int, default=300, help="held-out items")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="items per step")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--sft-rows", type=int, default=1000, help="training items whose responses form the SFT corpus")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    p.add_argument("--no-append", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixdpo_rankings_") as root:
        tokenizer = build_review_tokenizer(os.path.join(root, "tok"))
        results = {m: [run_seed(m, s, a, root, tokenizer) for s in range(a.seeds)] for m in a.m}
    cmd = "python benchmarks/bench_rankings.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = [f"### Rankings vs pairs: recovery of three pairwise-conflicting groups ({a.seeds} seed(s))", "",
            f"machine: {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPU, "
            f"torch {torch.__version__}, 1 thread); commit {commit()}; date "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; command `{cmd}`; data "
            f"`mixdpo_ds.apps.datasets.rankings` ({a.items} training items, {a.test} held-out, every pair split 2-vs-1 "
            f"by the rules); K = {K} heads on a frozen SFT trunk ({a.sft_steps} SFT steps), Mix-DPO gate, exact EM, "
            f"{a.steps} steps × {a.batch} items, the demo's lr / β / init noise; chance recovery 1/3; "
            f"total {time.perf_counter() - t0:.0f} s.", ""]
    text = "\n".join(head + table(results))
    print(text)
    if not a.no_append:
        with open(a.results, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
