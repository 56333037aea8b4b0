"""Few-shot personalisation of a trained Mix-DPO run: a new user's accuracy with posterior weights from N of their
labelled pairs (docs/math.md §13), against the global mixture, DPO and the oracle-routed accuracy.

    python benchmarks/bench_few_shot.py                                               # 3 seeds, N = 0,1,3,5,10,20
    python benchmarks/bench_few_shot.py --append benchmarks/RESULTS.md --figure docs/images/few_shot_curve.png
    python benchmarks/bench_few_shot.py --fast --seeds 1                              # smoke test (~1 min)

Per seed (one process per seed, `--workers` at a time, one torch thread each, as the demo): the demo's data + SFT
(`prepare_seed`), its multi-reward Mix-DPO run (K = 3 heads, global w, no user metadata) and its DPO baseline
(K = 1), both with the demo's budget; `--mixdpo KEY=VALUE` varies the Mix-DPO run, e.g. the recommended recipe
`gate.kind=moe gate.features=user em.lambda_global=1.0 experts.head_rank=4 train.max_steps=1800 loss.beta=0.3`
(a gate on the 9 training annotators' ids, which makes the experts identifiable, docs/math.md §13.5). Then new data
from the same generator with another seed (`ReviewsConfig(seed=10000 + seed, users_per_group=--users-per-group)`),
its users renamed `new_…` so that none is a training annotator (a user-id gate gives them the population prior):
its `train` split (`--calibration-pairs`)
calibrates the margins (`mixdpo calibrate`: one T on the per-pair mixture likelihood; one T, and one per expert,
on the per-user evidence; docs/math.md §13.2), its `test` split holds the few-shot users (3 groups ×
users_per_group users, `--pairs-per-user` pairs each on average). `few_shot_curve`: per user and
repeat, a random order of their pairs, the first N as context, the pairs after the first max(N) as queries.

Ceilings (the data's, from the true annotator rules, `apps/datasets/ceilings.py`) are printed next to the results:
the oracle-routed accuracy (each pair judged by its own group's true rule), the best global mixture, and the Bayes
few-shot curve: the same protocol with the true rules as the experts (margins = the true log-odds, w = the true
prior), the best any posterior from N pairs can do. The model's own "oracle routed" accuracy is each user's group's
matched expert (best-permutation matching, as evaluate's recovery), Δ > 0 on the same query pairs.
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
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch
from bench_scaling import commit

from mixdpo_ds.apps.datasets.ceilings import bayes_ceilings, chosen_probabilities
from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, read_jsonl, write_task
from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
from mixdpo_ds.apps.demo import DemoConfig, _init_worker, _Inline, _quiet, prepare_seed, run_job, run_plan
from mixdpo_ds.apps.report import fmt
from mixdpo_ds.training.config import parse_overrides
from mixdpo_ds.training.config_names import merge

SHOTS = (0, 1, 3, 5, 10, 20)
# name → (per_expert, by_user) of `calibration_report`: the per-pair mixture likelihood, the per-user evidence
CALIBRATIONS = {"pair": (False, False), "user": (False, True), "user_per_expert": (True, True)}


def bayes_rows(rows: list[dict], rcfg: ReviewsConfig, prior: list[float]) -> list[dict]:
    """evaluate-style rows whose experts are the true rules: margins = logit p_ig (clipped), w = the true prior."""
    p = np.clip(chosen_probabilities(rows, rcfg), 1e-6, 1 - 1e-6)  # (N, G)
    groups = rcfg.groups()
    logit = np.log(p) - np.log1p(-p)
    out = []
    for i, r in enumerate(rows):
        g = groups.index(r["group"])
        out.append({"index": i, "user": r["user"], "group_id": g, "group": r["group"], "w": list(prior),
                    "margins": logit[i].tolist(), "p_mixture": float(p[i] @ np.array(prior)), "expert": g})
    return out


def seed_job(cfg: DemoConfig, seed: int, tokenizer_dir: str, a: dict) -> dict:
    """Data + SFT, the Mix-DPO and DPO runs, calibration and the few-shot curves of one seed."""
    from mixdpo_ds.training.evaluate import score_pairs
    from mixdpo_ds.training.personalize import calibration_report, few_shot_curve, matched_experts

    t0 = time.perf_counter()
    prep = prepare_seed(cfg, seed, tokenizer_dir)
    plan = {name: (task, K, gate, over) for name, task, K, gate, over in run_plan(cfg)}
    runs = {}
    for name in ("mixdpo", "dpo_multi"):
        task, K, gate, over = plan[name]
        if name == "mixdpo":  # --mixdpo key=value: a variant of the demo's Mix-DPO run (e.g. experts.head_rank=4)
            over = merge(over, a.get("mixdpo_overrides", {}))
        runs[name] = run_job(cfg, prep, name, task, K, gate, over)
    rcfg = ReviewsConfig(task="multi", num_train=a["calibration_pairs"], num_sft=1, seed=10_000 + seed,
                         num_test=a["pairs_per_user"] * 3 * a["users_per_group"], users_per_group=a["users_per_group"])
    paths = write_task(rcfg, os.path.join(prep["root"], "data", "few_shot"))
    for split in ("train", "test"):  # new users: ids the training data cannot have, so a user-id gate gives them
        _rename_users(paths[split])  # the population prior, never a training user's row of the same name
    mix_dir, dpo_dir = (os.path.dirname(runs[n]["export"]) for n in ("mixdpo", "dpo_multi"))
    cal_rows = score_pairs(mix_dir, paths["train"], batch_size=100)["rows"]
    rows = score_pairs(mix_dir, paths["test"], batch_size=100)["rows"]
    dpo_rows = score_pairs(dpo_dir, paths["test"], batch_size=100)["rows"]
    out = {"seed": seed, "demo_heldout": runs["mixdpo"]["metrics"]["mixture"]["all"], "calibration": {}, "curves": {}}
    for name, (per_expert, by_user) in CALIBRATIONS.items():
        cal = calibration_report(cal_rows, per_expert=per_expert, by_user=by_user)
        out["calibration"][name] = {**cal, **{f"test_{k}": v for k, v in calibration_report_on(rows, cal).items()}}
        out["curves"][name] = few_shot_curve(rows, a["shots"], repeats=a["repeats"], seed=seed,
                                             temperature=cal["temperature"], dpo_rows=dpo_rows)
    test = read_jsonl(paths["test"])
    ceil = bayes_ceilings(read_jsonl(prep["tasks"]["multi"]["paths"]["train"])[:cfg.ceiling_rows], test, rcfg)
    out["ceilings"] = {"oracle_routed": ceil["oracle_routed_accuracy"]["all"],
                       "best_mixture": ceil["best_mixture_accuracy"]["all"],
                       "best_single_reward": ceil["best_single_reward_accuracy"]["all"]}
    brows = bayes_rows(test, rcfg, ceil["prior"])
    out["bayes_curve"] = few_shot_curve(brows, a["shots"], repeats=a["repeats"], seed=seed, temperature=[1.0])
    # where the N = 5 gap comes from: the same protocol on each annotator group's users alone, model and true rules
    groups = sorted({r["group"] for r in rows if r.get("group")})
    match = {"model": matched_experts(rows), "bayes": matched_experts(brows)}  # over all groups, then each alone
    temps = {"model": out["calibration"]["user"]["temperature"], "bayes": [1.0]}
    out["by_group"] = {g: {k: few_shot_curve([r for r in rs if r["group"] == g], a["shots"], repeats=a["repeats"],
                                             seed=seed, temperature=temps[k], oracle_experts=match[k])
                           for k, rs in (("model", rows), ("bayes", brows))} for g in groups}
    out["seconds"] = time.perf_counter() - t0
    if a.get("rows_dir"):
        with open(os.path.join(a["rows_dir"], f"rows_seed{seed}.json"), "w") as f:
            json.dump({"calibration": cal_rows, "test": rows, "dpo": dpo_rows, "bayes": brows}, f)
    shutil.rmtree(prep["root"], ignore_errors=True)
    return out


def _rename_users(path: str, prefix: str = "new_") -> None:
    """Rewrite a jsonl file with every `user` value prefixed (the few-shot users are not the training annotators)."""
    rows = read_jsonl(path)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "user": prefix + str(r["user"])}) + "\n")


def calibration_report_on(rows: list[dict], cal: dict) -> dict:
    """ECE / NLL / accuracy of p_mixture on other rows (the few-shot users), at T = 1 and at the fitted T."""
    from mixdpo_ds.core.personalize import (
        decision_accuracy,
        expected_calibration_error,
        mixture_nll,
        mixture_probability,
    )

    log_w = torch.tensor([r["w"] for r in rows], dtype=torch.float64).clamp_min(1e-300).log()
    m = torch.tensor([r["margins"] for r in rows], dtype=torch.float64)
    out = {}
    for name, t in (("before", 1.0), ("after", torch.tensor(cal["temperature"], dtype=torch.float64))):
        p = mixture_probability(log_w, m, t)
        out.update({f"ece_{name}": expected_calibration_error(p), f"nll_{name}": float(mixture_nll(log_w, m, t)),
                    f"accuracy_{name}": float(decision_accuracy(p).mean())})
    return out


def tables(results: list[dict], shots: list[int]) -> list[str]:
    """Markdown: the few-shot curve (mean ± sd, worst over seeds), the flat baselines, the calibration."""
    def col(f):
        return [f(r) for r in results]

    lines = ["| N context pairs | " + " | ".join(str(n) for n in shots) + " |", "|---|" + "---|" * len(shots)]
    variants = [("posterior, T = 1 (raw margins)", lambda r, j: r["curves"]["user"]["accuracy"]["raw"][j]),
                ("posterior, T fitted per pair (mixture NLL)",
                 lambda r, j: r["curves"]["pair"]["accuracy"]["calibrated"][j]),
                ("posterior, T fitted per user (evidence)",
                 lambda r, j: r["curves"]["user"]["accuracy"]["calibrated"][j]),
                ("posterior, per-expert T fitted per user",
                 lambda r, j: r["curves"]["user_per_expert"]["accuracy"]["calibrated"][j]),
                ("worst seed, T fitted per user", None),
                ("argmax q = the user's matched expert (T per user)",
                 lambda r, j: r["curves"]["user"]["routing"]["calibrated"][j]),
                ("ceiling: Bayes posterior with the true rules", lambda r, j: r["bayes_curve"]["accuracy"]["raw"][j])]
    for name, f in variants:
        if f is None:
            vals = [min(r["curves"]["user"]["accuracy"]["calibrated"][j] for r in results) for j in range(len(shots))]
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
            continue
        cells = [fmt([f(r, j) for r in results]) for j in range(len(shots))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    j5 = shots.index(5) if 5 in shots else len(shots) - 1
    gap = col(lambda r: r["curves"]["user"]["oracle_routed"] - r["curves"]["user"]["accuracy"]["calibrated"][j5])
    gap_raw = col(lambda r: r["curves"]["user"]["oracle_routed"] - r["curves"]["user"]["accuracy"]["raw"][j5])
    flat = [("global mixture (no user information)", col(lambda r: r["curves"]["user"]["global_mixture"])),
            ("DPO (K = 1)", col(lambda r: r["curves"]["user"]["dpo"])),
            ("oracle routed: each user's group's matched expert", col(lambda r: r["curves"]["user"]["oracle_routed"])),
            (f"oracle routed − posterior at N = {shots[j5]} (T = 1)", gap_raw),
            (f"oracle routed − posterior at N = {shots[j5]} (T fitted per user)", gap),
            ("ceiling: best global mixture (true rules, true prior)", col(lambda r: r["ceilings"]["best_mixture"])),
            ("ceiling: oracle routed (true rule of each group)", col(lambda r: r["ceilings"]["oracle_routed"]))]
    lines += ["", "| same query pairs | mean ± sd | worst seed |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(v)} | {(max(v) if 'posterior at' in name else min(v)):.3f} |" for name, v in flat]
    lines += ["", f"| each group's users alone, N = {shots[j5]} (T fitted per user) | posterior | argmax q = matched "
              "expert | oracle routed | gap | Bayes: posterior | Bayes: oracle routed | Bayes: gap |",
              "|---|---|---|---|---|---|---|---|"]
    for g in sorted(results[0].get("by_group", {})):
        m = col(lambda r, g=g: r["by_group"][g]["model"])
        b = col(lambda r, g=g: r["by_group"][g]["bayes"])
        lines.append(f"| {g} | {fmt([c['accuracy']['calibrated'][j5] for c in m])} | "
                     f"{fmt([c['routing']['calibrated'][j5] for c in m])} | {fmt([c['oracle_routed'] for c in m])} | "
                     f"{fmt([c['oracle_routed'] - c['accuracy']['calibrated'][j5] for c in m])} | "
                     f"{fmt([c['accuracy']['raw'][j5] for c in b])} | {fmt([c['oracle_routed'] for c in b])} | "
                     f"{fmt([c['oracle_routed'] - c['accuracy']['raw'][j5] for c in b])} |")
    lines += ["", "| calibration (fitted on the calibration pairs) | T | ECE before → after (calibration pairs) | "
              "ECE before → after (few-shot users' pairs) | NLL before → after (few-shot users) |",
              "|---|---|---|---|---|"]
    for name in CALIBRATIONS:
        c = col(lambda r, n=name: r["calibration"][n])
        T = np.array([x["temperature"] for x in c])
        lines.append(f"| {name.replace('_', ' ')} | {' / '.join(fmt(T[:, k]) for k in range(T.shape[1]))} | "
                     f"{fmt([x['ece_before'] for x in c])} → {fmt([x['ece_after'] for x in c])} | "
                     f"{fmt([x['test_ece_before'] for x in c])} → {fmt([x['test_ece_after'] for x in c])} | "
                     f"{fmt([x['test_nll_before'] for x in c])} → {fmt([x['test_nll_after'] for x in c])} |")
    return lines


def figure(results: list[dict], shots: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.array(shots)

    def band(values, label, **kw):
        v = np.array(values)
        ax.errorbar(x, v.mean(0), yerr=v.std(0), capsize=3, label=label, **kw)

    band([r["curves"]["user"]["accuracy"]["calibrated"] for r in results], "posterior, T fitted per user",
         marker="o")
    band([r["curves"]["user"]["accuracy"]["raw"] for r in results], "posterior, T = 1", marker="s", alpha=0.7)
    band([r["bayes_curve"]["accuracy"]["raw"] for r in results], "ceiling: Bayes posterior, true rules",
         linestyle="--", color="gray")
    for key, label, style in (("oracle_routed", "oracle routed (matched expert)", "-."),
                              ("global_mixture", "global mixture", ":"), ("dpo", "DPO (K=1)", ":")):
        ax.axhline(np.mean([r["curves"]["user"][key] for r in results]), linestyle=style, label=label,
                   color={"oracle_routed": "C2", "global_mixture": "C3", "dpo": "C4"}[key])
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(x, [str(n) for n in shots])
    ax.set_xlabel("labelled pairs of the new user (N)")
    ax.set_ylabel("accuracy on the user's other pairs")
    ax.set_title(f"Few-shot personalisation of Mix-DPO (K = 3), {len(results)} seeds")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--shots", default=",".join(map(str, SHOTS)), help="comma-separated N values")
    p.add_argument("--repeats", type=int, default=5, help="random context draws per user")
    p.add_argument("--users-per-group", type=int, default=10, help="few-shot users per annotator group")
    p.add_argument("--pairs-per-user", type=int, default=60, help="few-shot pairs per user (on average)")
    p.add_argument("--calibration-pairs", type=int, default=1000, help="held-out pairs the temperature is fit on")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--mixdpo", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the Mix-DPO run only (e.g. experts.head_rank=4); DPO stays the demo's")
    p.add_argument("--demo", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="DemoConfig fields of every run (e.g. n_embd=128 sft_steps=400: the base model both Mix-DPO "
                        "and DPO start from)")
    p.add_argument("--fast", action="store_true", help="the demo's --fast sizes: a smoke test")
    p.add_argument("--append", default=None, metavar="FILE", help="append the tables (markdown) to FILE")
    p.add_argument("--figure", default=None, metavar="PNG", help="write the few-shot curve figure")
    p.add_argument("--json", default=None, metavar="FILE", help="write every seed's results")
    p.add_argument("--rows-dir", default=None, help="write every seed's scored pairs (calibration, few-shot users, "
                                                    "DPO) to DIR/rows_seed{s}.json")
    a = p.parse_args(argv)
    shots = sorted({int(n) for n in a.shots.split(",")})
    opts = {"shots": shots, "repeats": a.repeats, "users_per_group": a.users_per_group,
            "pairs_per_user": a.pairs_per_user, "calibration_pairs": a.calibration_pairs,
            "rows_dir": os.path.abspath(a.rows_dir) if a.rows_dir else None,
            "mixdpo_overrides": parse_overrides(a.mixdpo)}
    _quiet()
    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="mixdpo_few_shot_")
    cfg = DemoConfig(out=out, seeds=a.seeds, fast=a.fast, workers=a.workers, progress_bar=False)
    cfg.user_gate = False
    for item in a.demo:
        key, _, value = item.partition("=")
        if not hasattr(cfg, key) or not value:
            raise SystemExit(f"--demo {item!r}: not FIELD=VALUE with FIELD one of DemoConfig's")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    t0 = time.perf_counter()
    tokenizer_dir = os.path.join(out, "runs", "tokenizer")
    build_review_tokenizer(tokenizer_dir)
    pool = _Inline() if a.workers == 1 else ProcessPoolExecutor(max_workers=a.workers, mp_context=get_context("spawn"),
                                                                initializer=_init_worker)
    try:
        futures = [pool.submit(seed_job, cfg, seed, tokenizer_dir, opts) for seed in range(a.seeds)]
        results = [f.result() for f in futures]
    finally:
        pool.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f)
    if a.figure:
        figure(results, shots, a.figure)
    cmd = shlex.join(["python", "benchmarks/bench_few_shot.py", *(sys.argv[1:] if argv is None else argv)])
    c = results[0]["curves"]["user"]
    # --mixdpo overrides change the Mix-DPO run only (its steps among them); the header says so
    mix_note = (f" (Mix-DPO with {' '.join(a.mixdpo)}; DPO as the demo's)" if a.mixdpo else "")
    mix_note += f"; demo fields {' '.join(a.demo)} for both" if a.demo else ""
    gate_over = opts["mixdpo_overrides"].get("gate")
    gate = ("global w" if gate_over is None else
            "a user-id gate" if "user" in str(gate_over.get("features", "")) else "gate as set below")
    head = [f"### Few-shot personalisation of Mix-DPO ({a.seeds} seed(s): mean ± sd, worst seed)", "",
            f"machine: {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPU, torch "
            f"{torch.__version__}, {a.workers} worker(s) × 1 thread); commit {commit()}; date "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; command `{cmd}`; the demo's "
            f"multi-reward Mix-DPO (K = 3, {gate}) and DPO runs, {cfg.steps} steps × {cfg.batch_size} pairs over "
            f"{cfg.num_train} training pairs{mix_note}; few-shot users: {c['users']} new users (3 groups × "
            f"{a.users_per_group}), {c['query_pairs']} query pairs per repeat, {a.repeats} context draws per user, "
            f"query set = each user's pairs after the first {shots[-1]}; temperature fitted on "
            f"{a.calibration_pairs} other new pairs; total {elapsed:.0f} s.", ""]
    text = "\n".join(head + tables(results, shots))
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
