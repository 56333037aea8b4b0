"""Gate lock-in across seeds and gate learning rates, with the gate safeguards (SAFEGUARDS) off vs on.

    python benchmarks/bench_gate_collapse.py                                  # tasks A and B, 5 seeds
    python benchmarks/bench_gate_collapse.py --tasks A --seeds 5 --append benchmarks/RESULTS.md
    python benchmarks/bench_gate_collapse.py --fast --tasks A --safeguards-json '{}'      # smoke test

Lock-in: a learnable MoE gate saturates before the experts have separated, so two annotator groups end up routed
to one expert and stay there (the posterior can no longer move them).

- Task A ("user-decided groups"): the demo's multi-reward data with `users_per_group` annotators per group (default
  10: 30 users, 3 groups; the user id decides the group), the demo's "moe_user" run (K=3 heads on the frozen SFT
  trunk, MoE gate on `user`, its em.lambda_global, the contextual budget ctx_steps × ctx_batch_size), over seeds ×
  gate.lr × safeguards. Per run: gate routing (best-permutation accuracy of argmax w against the true group on the
  held-out pairs, `held_out_metrics`' `gate_routing`), held-out mixture accuracy, collapsed = routing < 0.95.
- Task B: the demo's multi-reward Mix-DPO run ("mixdpo", its full budget) and its DPO baseline ("dpo_multi", once
  per seed, no overrides: K=1 has no gate to guard), over seeds × safeguards: per group, the group-matched expert's
  held-out accuracy on it minus DPO's.

"off" merges SAFEGUARDS_OFF (the defaults with their safeguards off); "on" merges SAFEGUARDS (nested run-config
overrides, merged last) into the run.
The demo's pieces do the work (`prepare_seed` data + SFT once per seed, shared by all its runs; `run_job` per run;
`--workers` spawned processes with one torch thread each, as the demo). Tables go to stdout and, with --append, to a
markdown file with machine, commit, date, command and the SAFEGUARDS used; every run's metrics to OUT/results.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context

import numpy as np
import torch
from bench_ablations import _commit

from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, write_task
from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
from mixdpo_ds.apps.demo import DemoConfig, _init_worker, _Inline, _quiet, prepare_seed, run_config, run_job, run_plan
from mixdpo_ds.apps.report import fmt
from mixdpo_ds.training.config import merge

# The safeguards against gate lock-in, as nested run-config overrides merged into every "on" run (--safeguards-json
# replaces this dict); "off" runs merge SAFEGUARDS_OFF, which turns the defaults' safeguards off:
#   gate.trust_region     ρ: each gate step moves the gate about ρ of the way (in KL) to the experts' posterior,
#                         so while the experts are alike (q ≈ w) the gate does not move, whatever gate.lr
#                         (docs/math.md §12);
#   gate.trust_max_scale  with 1000 the region also lengthens short steps: the region, not gate.lr, sets the step.
SAFEGUARDS = {"gate": {"trust_region": 0.1, "trust_max_scale": 1000.0}}
SAFEGUARDS_OFF = {"gate": {"trust_region": 0.0}}
GATE_LRS = (1e-3, 1e-2, 5e-2, 1e-1, 3e-1)  # 0.05 is gate.lr's default
FAST_GATE_LRS = (1e-2, 3e-1)
USERS_PER_GROUP = 10
COLLAPSE_BELOW = 0.95  # gate routing below this = collapsed (two groups share an expert: routing ≈ 2/3)
SETTINGS = ("off", "on")


def prepare(cfg: DemoConfig, seed: int, tokenizer_dir: str, users_per_group: int) -> dict:
    """The demo's data + SFT for one seed, plus task A's multi-reward data with `users_per_group` users per group
    (same seed and sizes as the demo's multi-reward task; `prep["tasks"]["users"]`)."""
    prep = prepare_seed(cfg, seed, tokenizer_dir)
    rcfg = ReviewsConfig(task="multi", num_train=cfg.num_train, num_test=cfg.num_test, num_sft=cfg.num_sft,
                         seed=seed, users_per_group=users_per_group)
    paths = write_task(rcfg, os.path.join(prep["root"], "data", f"multi_users{users_per_group}"))
    prep["tasks"]["users"] = {"paths": paths, "groups": rcfg.groups()}
    for info in prep["tasks"].values():
        info.pop("test", None)  # not needed by run_job; keeps the pickles sent to the workers small
    return prep


def job(cfg: DemoConfig, prep: dict, name: str, task: str, K: int, gate: str, overrides: dict,
        keep_runs: bool) -> dict:
    """`run_job` on the demo task `task` of `prep` (task A: its "users" data in the demo's "multi" slot, so every
    task-dependent setting is the demo's moe_user run's); the run folder is removed unless keep_runs."""
    if task == "users":
        prep = {**prep, "tasks": {"multi": prep["tasks"]["users"]}}
        task = "multi"
    res = run_job(cfg, prep, name, task, K, gate, overrides)
    if not keep_runs:
        shutil.rmtree(os.path.join(prep["root"], name), ignore_errors=True)
    return {"metrics": res["metrics"], "seconds": res["seconds"]}


def plan_jobs(cfg: DemoConfig, tasks: list[str], lrs: list[float], safeguards: dict,
              settings: tuple[str, ...] = SETTINGS) -> list[tuple]:
    """(name, key, task, K, gate, overrides) of one seed's runs, longest first; key identifies the table cell."""
    demo = {name: (task, K, gate, over) for name, task, K, gate, over in run_plan(cfg)}
    guard = {"off": SAFEGUARDS_OFF, "on": safeguards}
    jobs = []
    if "B" in tasks:
        _, K, gate, over = demo["dpo_multi"]
        jobs.append(("B_dpo", ("B", "dpo"), "multi", K, gate, over))
        _, K, gate, over = demo["mixdpo"]
        jobs += [(f"B_mixdpo_{s}", ("B", s), "multi", K, gate, merge(over, guard[s])) for s in settings]
    if "A" in tasks:
        _, K, gate, over = demo["moe_user"]
        jobs += [(f"A_{s}_lr{lr:g}", ("A", s, lr), "users", K, gate, merge(merge(over, {"gate": {"lr": lr}}),
                                                                             guard[s]))
                 for s in settings for lr in lrs]
    return jobs


def _line(seed: int, key: tuple, res: dict) -> str:
    m = res["metrics"]
    extra = f"gate routing {m['gate_routing']:.3f}" if key[0] == "A" else \
        "routed " + " ".join(f"{g} {v:.3f}" for g, v in m["routed"].items())
    return f"seed {seed} {'/'.join(map(str, key))}: acc {m['mixture']['all']:.3f}, {extra} ({res['seconds']:.1f}s)"


def run_grid(cfg: DemoConfig, seeds: int, jobs: list[tuple], tokenizer_dir: str, users_per_group: int,
             keep_runs: bool, t0: float) -> dict:
    """Every seed's prepare → runs on cfg.workers processes (as the demo's run_all). Returns {seed: {key: result}}."""
    pool = _Inline() if cfg.workers == 1 else ProcessPoolExecutor(
        max_workers=cfg.workers, mp_context=get_context("spawn"), initializer=_init_worker)
    pending, results, done, n_jobs = {}, {s: {} for s in range(seeds)}, 0, seeds * (len(jobs) + 1)
    try:
        for seed in range(seeds):
            pending[pool.submit(prepare, cfg, seed, tokenizer_dir, users_per_group)] = (seed, None)
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                seed, key = pending.pop(fut)
                value = fut.result()  # a failed job raises here, with its worker's traceback
                done += 1
                if key is None:
                    print(f"[{time.perf_counter() - t0:7.1f}s] [{done}/{n_jobs}] seed {seed}: data + SFT ready",
                          flush=True)
                    for name, k, task, K, gate, over in jobs:
                        pending[pool.submit(job, cfg, value, name, task, K, gate, over, keep_runs)] = (seed, k)
                else:
                    results[seed][key] = value
                    print(f"[{time.perf_counter() - t0:7.1f}s] [{done}/{n_jobs}] {_line(seed, key, value)}", flush=True)
    finally:
        pool.shutdown(cancel_futures=True)
    return results


def _settings(results: dict) -> list[str]:
    """The safeguard settings present in the results, in SETTINGS order."""
    keys = {key[1] for r in results.values() for key in r}
    return [s for s in SETTINGS if s in keys]


def table_a(results: dict, lrs: list[float]) -> list[str]:
    lines = [f"#### A: MoE gate on `user`, user-decided groups (collapsed = gate routing < {COLLAPSE_BELOW})", "",
             "| safeguards | gate.lr | gate routing | worst routing | held-out acc (mixture) | collapsed | s / run |",
             "|---|---|---|---|---|---|---|"]
    for s in _settings(results):
        for lr in lrs:
            rs = [r[("A", s, lr)] for r in results.values()]
            route = [r["metrics"]["gate_routing"] for r in rs]
            acc = [r["metrics"]["mixture"]["all"] for r in rs]
            lines.append(f"| {s} | {lr:g} | {fmt(route)} | {min(route):.3f} | {fmt(acc)} | "
                         f"{sum(x < COLLAPSE_BELOW for x in route)}/{len(rs)} | "
                         f"{np.mean([r['seconds'] for r in rs]):.1f} |")
    return lines


def table_b(results: dict) -> list[str]:
    groups = ReviewsConfig(task="multi").groups()
    lines = ["#### B: multi-reward Mix-DPO, matched expert minus DPO (K=1) on each group's held-out pairs", "",
             "| safeguards | " + " | ".join(f"Δ {g}" for g in groups) +
             " | mean Δ | min Δ (groups × seeds) | runs with every group > DPO | mixture acc (DPO → Mix) | recovery "
             "| s / run |", "|" + "---|" * (len(groups) + 7)]
    for s in _settings(results):
        gaps, wins, acc_d, acc_m, rec, secs = [], 0, [], [], [], []
        for r in results.values():
            dpo, mix = r[("B", "dpo")]["metrics"], r[("B", s)]["metrics"]
            gap = [mix["routed"].get(g, float("nan")) - dpo["expert_by_group"][0][j] for j, g in enumerate(groups)]
            gaps.append(gap)
            wins += all(x > 0 for x in gap)  # a NaN (group without a matched expert) is not a win
            acc_d.append(dpo["mixture"]["all"])
            acc_m.append(mix["mixture"]["all"])
            rec.append(mix["recovery"])
            secs.append(r[("B", s)]["seconds"])
        g = np.array(gaps)  # (seeds, groups)
        lines.append(f"| {s} | " + " | ".join(fmt(g[:, j]) for j in range(len(groups))) +
                     f" | {np.nanmean(g):+.3f} | {np.min(g):+.3f} | {wins}/{len(gaps)} | "
                     f"{fmt(acc_d)} → {fmt(acc_m)} | {fmt(rec)} | {np.mean(secs):.1f} |")
    return lines


def resolved_gate(cfg: DemoConfig, safeguards: dict) -> dict:
    """The gate settings the off / on runs actually get (config defaults ← demo ← SAFEGUARDS), for the header."""
    demo = {name: (K, gate, over) for name, _, K, gate, over in run_plan(cfg)}
    K, gate, over = demo["moe_user"]
    out = {}
    for s, extra in (("off", SAFEGUARDS_OFF), ("on", safeguards)):
        try:
            g = run_config(cfg, "base", "train.jsonl", "run", K, gate, 0, merge(over, extra)).gate
            out[s] = {k: getattr(g, k, None) for k in ("trust_region", "trust_max_scale", "hold_steps", "w_min",
                                                        "adam_epsilon")}
        except Exception as e:  # noqa: BLE001 — a header detail; the runs themselves report config errors
            out[s] = f"not resolved: {e}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="A,B", help="comma-separated: A (MoE gate on user), B (Mix-DPO vs DPO)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 5; 2 with --fast)")
    p.add_argument("--lrs", default=None, help="comma-separated gate.lr values of task A (default "
                                               f"{','.join(map(str, GATE_LRS))}; with --fast {FAST_GATE_LRS})")
    p.add_argument("--safeguards-json", default=None, help="replaces SAFEGUARDS (a JSON object of run-config "
                                                           f"overrides; default {json.dumps(SAFEGUARDS)})")
    p.add_argument("--settings", default="off,on", help="which of off,on to run (the off runs use the defaults)")
    p.add_argument("--users-per-group", type=int, default=USERS_PER_GROUP, help="task A: user ids per group")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (as the demo's)")
    p.add_argument("--fast", action="store_true", help="the demo's --fast sizes (80 steps × 32 pairs, 800 pairs), "
                                                       "2 seeds, 2 gate learning rates: a smoke test")
    p.add_argument("--steps", type=int, default=None, help="override the steps of every run (as the demo's)")
    p.add_argument("--out", default=None, help="run folder (default: a new temporary one, removed at the end)")
    p.add_argument("--keep-runs", action="store_true", help="keep every run's folder (checkpoint, export, eval)")
    p.add_argument("--append", default=None, metavar="FILE", help="append the tables (markdown) to FILE")
    a = p.parse_args(argv)
    tasks = [t.strip().upper() for t in a.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"A", "B"}:
        p.error(f"--tasks: A and/or B, got {a.tasks!r}")
    safeguards = SAFEGUARDS if a.safeguards_json is None else json.loads(a.safeguards_json)
    if not isinstance(safeguards, dict):
        p.error("--safeguards-json must be a JSON object")
    seeds = a.seeds or (2 if a.fast else 5)
    lrs = [float(x) for x in a.lrs.split(",")] if a.lrs else list(FAST_GATE_LRS if a.fast else GATE_LRS)

    _quiet()
    torch.set_num_threads(1)
    out = a.out or tempfile.mkdtemp(prefix="mixdpo_gate_collapse_")
    cfg = DemoConfig(out=out, seeds=seeds, fast=a.fast, workers=a.workers, progress_bar=False)
    cfg.user_gate = True  # --fast turns the demo's moe_user run off; task A is that run
    if a.steps is not None:
        cfg.steps = cfg.ctx_steps = a.steps
    settings = tuple(x.strip() for x in a.settings.split(",") if x.strip())
    if not settings or set(settings) - set(SETTINGS):
        p.error(f"--settings: off and/or on, got {a.settings!r}")
    jobs = plan_jobs(cfg, tasks, lrs, safeguards, settings)
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    tokenizer_dir = os.path.join(out, "runs", "tokenizer")
    build_review_tokenizer(tokenizer_dir)
    print(f"{seeds} seed(s) × {len(jobs)} runs (+ data/SFT per seed) on {cfg.workers} process(es); tasks {tasks}; "
          f"SAFEGUARDS {json.dumps(safeguards)}; runs in {out}", flush=True)
    try:
        results = run_grid(cfg, seeds, jobs, tokenizer_dir, a.users_per_group, a.keep_runs, t0)
    finally:
        if a.out is None and not a.keep_runs:
            shutil.rmtree(out, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    if a.out is not None or a.keep_runs:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"seeds": seeds, "safeguards": safeguards, "seconds": elapsed,
                       "runs": [{"seed": s, "key": list(k), **v} for s, r in results.items() for k, v in r.items()]},
                      f)

    tables = []
    if "A" in tasks:
        tables += table_a(results, lrs) + [""]
    if "B" in tasks:
        tables += table_b(results) + [""]
    cmd = shlex.join(["python", "benchmarks/bench_gate_collapse.py", *(sys.argv[1:] if argv is None else argv)])
    budgets = {"A": f"task A: {3 * a.users_per_group} users ({a.users_per_group} per group), the demo's moe_user run, "
                     f"{cfg.ctx_steps} steps × {cfg.ctx_batch_size} pairs",
               "B": f"task B: the demo's mixdpo and dpo_multi runs, {cfg.steps} steps × {cfg.batch_size} pairs"}
    head = [f"### Gate lock-in: safeguards off vs on ({seeds} seed(s), mean ± sd)", "",
            f"machine: {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPU, "
            f"torch {torch.__version__}, {cfg.workers} worker(s) × 1 thread); commit {_commit()}; date "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; command `{cmd}`; "
            f"SAFEGUARDS (the \"on\" overrides) `{json.dumps(safeguards)}`, resolved gate settings "
            f"`{json.dumps(resolved_gate(cfg, safeguards))}`; {'; '.join(budgets[t] for t in tasks)} "
            f"({cfg.num_train} training pairs); lr {cfg.lr}, β {cfg.beta}; total {elapsed:.0f} s.", ""]
    text = "\n".join(head + tables)
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
