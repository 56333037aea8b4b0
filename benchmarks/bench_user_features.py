"""Gates on user features route users never seen in training (paper App. G): MoE-DPO on the multi-reward task with
the gate on `user_features` vs on the user-id embedding, evaluated on users disjoint from the training users.

    python benchmarks/bench_user_features.py                                  # 3 seeds
    python benchmarks/bench_user_features.py --seeds 3 --append benchmarks/RESULTS.md
    python benchmarks/bench_user_features.py --fast --seeds 1                 # smoke test
    python benchmarks/bench_user_features.py --first-seed 5 --seeds 5 --set train.max_steps=1000   # a variant

Per seed: the demo's data + SFT (`prepare_seed`); the multi-reward training pairs with `--users-per-group` users per
group (as bench_gate_collapse's task A), each user given features (`apps/datasets/user_profiles.py`: a pool, a 2-d
profile that decides the group, a country that is noise); held-out pairs relabelled to new users (ids ≥ 1000, their
own features drawn the same way). Runs, all with the demo's moe_user settings (K = 3 heads on the frozen SFT trunk,
MoE gate, em.lambda_global 1, ctx_steps × ctx_batch_size):
- `user` (id embedding): an unseen user takes the population prior, the mean of the training users' weights;
- `user_features`, pool = group (p_pool 1): the features decide the group twice over;
- `user_features`, p_pool 0.7: the pool is wrong for 30 % of users, the profile still decides.
Gate routing = best-permutation accuracy of argmax w against the true group on the held-out pairs of the unseen
users (and, for reference, of the seen users' held-out pairs); held-out accuracy = the mixture's (Σ w σ(Δ) > ½).
Misrouted users (argmax of their mean w is not their group's matched expert) against the users `mixdpo evaluate`'s
`gate_evidence` flags (their own held-out pairs outvote a committed gate): how well the check finds a lock-in. An id
embedding gives every unseen user the same prior, so two thirds of them count as misrouted there, and none is
flagged (the prior does not commit).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch
from bench_scaling import commit

from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, read_jsonl, write_jsonl, write_task
from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
from mixdpo_ds.apps.datasets.user_profiles import add_user_features, user_feature_specs
from mixdpo_ds.apps.demo import DemoConfig, _init_worker, _Inline, _quiet, prepare_seed, run_config, run_plan
from mixdpo_ds.apps.report import fmt
from mixdpo_ds.training.config import merge, parse_overrides

VARIANTS = {"user id embedding": ("user", 1.0), "user features, pool = group": ("user_features", 1.0),
            "user features, pool right for 70 %": ("user_features", 0.7)}


def write_data(root: str, seed: int, cfg: DemoConfig, users_per_group: int, p_pool: float) -> dict:
    """train (training users with features), seen (held-out pairs of the training users), unseen (held-out pairs of
    new users, ids from 1000, with their own features)."""
    rcfg = ReviewsConfig(task="multi", num_train=cfg.num_train, num_test=2 * cfg.num_test, num_sft=1, seed=seed,
                         users_per_group=users_per_group)
    paths = write_task(rcfg, os.path.join(root, "base"))
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    seen, unseen = test[:len(test) // 2], test[len(test) // 2:]
    for r in unseen:
        group, k = r["user"].rsplit("_", 1)
        r["user"] = f"{group}_{1000 + int(k)}"
    profiles = add_user_features(train, rcfg.groups(), seed, p_pool)
    for r in seen:
        r.update(profiles[r["user"]])
    add_user_features(unseen, rcfg.groups(), seed + 5000, p_pool)
    out = {}
    for name, rows in (("train", train), ("seen", seen), ("unseen", unseen)):
        out[name] = write_jsonl(rows, os.path.join(root, f"{name}.jsonl"))
    return out


def routing(rows: list[dict], K: int) -> dict:
    """Best-permutation routing accuracy of argmax w; the misrouted users (argmax of their mean w not their group's
    matched expert) and the users `gate_evidence` flags (their own pairs outvote the gate), as sorted name lists."""
    from mixdpo_ds.training.evaluate import gate_evidence, recovery_accuracy

    groups = sorted({r["group"] for r in rows})
    rec = recovery_accuracy([int(np.argmax(r["w"])) for r in rows], [groups.index(r["group"]) for r in rows],
                            K, len(groups))
    by_user: dict[str, list[dict]] = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    misrouted = sorted(u for u, rs in by_user.items()
                       if int(np.argmax(np.mean([r["w"] for r in rs], 0))) != rec["mapping"].get(
                           groups.index(rs[0]["group"])))
    flagged = sorted(d["user"] for d in gate_evidence(rows)["disagreements"])
    return {"accuracy": rec["accuracy"], "misrouted": misrouted, "flagged": flagged}


def one_run(cfg: DemoConfig, prep: dict, name: str, features: str, p_pool: float, users_per_group: int,
            extra: dict | None = None) -> dict:
    """One variant on one seed; `extra`: config overrides (nested dict, `--set`) merged last."""
    from mixdpo_ds.training.evaluate import score_pairs
    from mixdpo_ds.training.trainer import MixDPOTrainer

    t0 = time.perf_counter()
    root = os.path.join(prep["root"], name.replace(" ", "_").replace(",", "").replace("%", ""))
    data = write_data(os.path.join(root, "data"), prep["seed"], cfg, users_per_group, p_pool)
    plan = {n: (K, gate, over) for n, _, K, gate, over in run_plan(cfg)}
    K, gate, over = plan["moe_user"]
    gate_over = {"features": features}
    if features == "user_features":
        gate_over["user_features"] = user_feature_specs(3)
    run_cfg = run_config(cfg, prep["base_dir"], data["train"], os.path.join(root, "run"), K, gate, prep["seed"],
                         merge({**over, "gate": {**over.get("gate", {}), **gate_over}}, extra or {}))
    trainer = MixDPOTrainer(run_cfg)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    out = {"seconds": 0.0}
    for split in ("seen", "unseen"):
        rows = score_pairs(os.path.join(root, "run"), data[split], batch_size=100)["rows"]
        rt = routing(rows, K)
        out[split] = {"routing": rt["accuracy"], "misrouted": rt["misrouted"], "flagged": rt["flagged"],
                      "accuracy": float(np.mean([r["p_mixture"] > 0.5 for r in rows]))}
    shutil.rmtree(root, ignore_errors=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def seed_job(cfg: DemoConfig, seed: int, tokenizer_dir: str, users_per_group: int, extra: dict | None = None) -> dict:
    prep = prepare_seed(cfg, seed, tokenizer_dir)
    res = {name: one_run(cfg, prep, name, f, p, users_per_group, extra) for name, (f, p) in VARIANTS.items()}
    res["seed"] = seed
    shutil.rmtree(prep["root"], ignore_errors=True)
    return res


def flag_summary(rs: list[dict]) -> str:
    """'M misrouted, F flagged, B both' over seeds and both splits: how well gate_evidence finds misrouted users."""
    mis = {(i, s, u) for i, r in enumerate(rs) for s in ("seen", "unseen") for u in r[s]["misrouted"]}
    flag = {(i, s, u) for i, r in enumerate(rs) for s in ("seen", "unseen") for u in r[s]["flagged"]}
    return f"{len(mis)} misrouted, {len(flag)} flagged, {len(mis & flag)} both"


def table(results: list[dict]) -> list[str]:
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines = [f"| gate input | routing, unseen users | worst seed | per seed ({seeds}"
             ") | routing, seen users | held-out acc, unseen | held-out acc, seen | misrouted users, flagged by "
             "gate_evidence (all seeds, seen + unseen) | s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        rs = [r[name] for r in results]
        un = [r["unseen"]["routing"] for r in rs]
        lines.append(f"| {name} | {fmt(un)} | {min(un):.3f} | {' / '.join(f'{u:.3f}' for u in un)} | "
                     f"{fmt([r['seen']['routing'] for r in rs])} | "
                     f"{fmt([r['unseen']['accuracy'] for r in rs])} | {fmt([r['seen']['accuracy'] for r in rs])} | "
                     f"{flag_summary(rs)} | "
                     f"{np.mean([r['seconds'] for r in rs]):.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first_seed … first_seed + seeds − 1")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. train.max_steps=1000 gate.trust_region=0.2")
    p.add_argument("--users-per-group", type=int, default=10, help="training users per annotator group")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--fast", action="store_true", help="the demo's --fast sizes: a smoke test")
    p.add_argument("--append", default=None, metavar="FILE", help="append the table (markdown) to FILE")
    a = p.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="mixdpo_user_features_")
    cfg = DemoConfig(out=out, seeds=a.seeds, fast=a.fast, workers=a.workers, progress_bar=False)
    cfg.user_gate = True  # the moe_user run is the template
    extra = parse_overrides(a.set)
    steps = extra.get("train", {}).get("max_steps", cfg.ctx_steps)
    t0 = time.perf_counter()
    tokenizer_dir = os.path.join(out, "runs", "tokenizer")
    build_review_tokenizer(tokenizer_dir)
    pool = _Inline() if a.workers == 1 else ProcessPoolExecutor(max_workers=a.workers, mp_context=get_context("spawn"),
                                                                initializer=_init_worker)
    try:
        results = [f.result() for f in [pool.submit(seed_job, cfg, s, tokenizer_dir, a.users_per_group, extra)
                                        for s in range(a.first_seed, a.first_seed + a.seeds)]]
    finally:
        pool.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    cmd = shlex.join(["python", "benchmarks/bench_user_features.py", *(sys.argv[1:] if argv is None else argv)])
    head = [f"### Gate on user features: routing of unseen users ({a.seeds} seed(s), mean ± sd, worst seed)", "",
            f"machine: {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPU, torch "
            f"{torch.__version__}, {a.workers} worker(s) × 1 thread); commit {commit()}; date "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; command `{cmd}`; the demo's "
            f"moe_user run (K = 3, MoE gate, {steps} steps × {cfg.ctx_batch_size} pairs over {cfg.num_train} "
            f"training pairs of {3 * a.users_per_group} users); {cfg.num_test} held-out pairs of the training users "
            f"and {cfg.num_test} of {3 * a.users_per_group} new users; ceiling of routing: 1.0 (the profile decides "
            f"the group); chance 1/3; total {elapsed:.0f} s.", ""]
    text = "\n".join(head + table(results))
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
