"""`mixdpo demo`: the paper's two experiments (§4.1 Mix-DPO, §4.2 MoE-DPO) in miniature, end to end on a CPU.

    mixdpo demo                         # 3 seeds, report in ./mixdpo_report (≤ 5 min on 2 CPU cores)
    mixdpo demo --out /tmp/r --seeds 1 --fast

Per seed: synthetic review data with known annotator groups (`mixdpo_ds.apps.datasets`) → SFT warm-up of a tiny GPT-2
(`mixdpo_ds.apps.sft`) → through the real trainer (`MixDPOTrainer`, DeepSpeed engine; the runs of all seeds are spread
over `--workers` processes): DPO (K=1) and Mix-DPO (K=3 heads) on the multi-reward task, DPO and MoE-DPO (K=2 heads,
gate on the prompt) on the contextual task, each pair of runs with the same steps, batch and lr →
`mixdpo_ds.training.evaluate.evaluate_run` on held-out pairs → samples from every expert scored by the annotators'
reward functions (`mixdpo_ds.apps.demo_samples`) → `report.md` + PNG figures (`mixdpo_ds.apps.report`), with the
Bayes ceilings of the data next to what the runs achieved.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from mixdpo_ds.apps.datasets.ceilings import bayes_ceilings
from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, read_jsonl, write_task
from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
from mixdpo_ds.apps.demo_samples import sample_tables
from mixdpo_ds.apps.sft import SFTConfig, build_tiny_base
from mixdpo_ds.training.callbacks import TrainerCallback

log = logging.getLogger("mixdpo_ds")


@dataclass
class DemoConfig:
    out: str = field(default="mixdpo_report", metadata={"help": "report folder"})
    seeds: int = field(default=3, metadata={"help": "seeds (data, model, training); results are mean ± sd"})
    fast: bool = field(default=False, metadata={"help": "fewer steps and pairs (the integration test)"})
    num_train: int = field(default=20000, metadata={
        "help": "multi-reward training pairs: EM needs many distinct pairs (with 2000 pairs seen 4 times the experts "
                "memorised and stayed near the pooled solution; measured, see the README)"})
    num_train_contextual: int = field(default=2000, metadata={"help": "contextual-task training pairs"})
    num_test: int = field(default=400, metadata={"help": "held-out pairs per task"})
    num_sft: int = field(default=2000, metadata={"help": "SFT rows per task"})
    ceiling_rows: int = field(default=5000, metadata={"help": "training pairs the Bayes ceilings are fitted on"})
    sft_steps: int = field(default=150, metadata={"help": "SFT warm-up steps"})
    steps: int = field(default=450, metadata={"help": "multi-reward task: DPO and Mix-DPO steps (the same for both)"})
    batch_size: int = field(default=128, metadata={"help": "multi-reward task: pairs per step"})
    ctx_steps: int = field(default=250, metadata={
        "help": "contextual task (DPO and MoE-DPO) and the annotator-id MoE-DPO: steps"})
    ctx_batch_size: int = field(default=32, metadata={"help": "pairs per step of the ctx_steps runs"})
    workers: int = field(default=2, metadata={
        "help": "processes that run the demo's jobs (data + SFT per seed, one job per training run, sampling per "
                "seed) in parallel, one torch thread each; 1 = all in this process"})
    lr: float = field(default=1e-2, metadata={"help": "lr of the expert heads (frozen trunk)"})
    beta: float = field(default=0.1, metadata={"help": "DPO β"})
    rpo_alpha: float = field(default=0.0, metadata={
        "help": "loss.rpo_alpha of every run (chosen-NLL term). It keeps end-of-sequence alive in samples, but at "
                "0.03-1 it also stopped the experts from specialising (measured), so the demo uses 0"})
    init_noise: float = field(default=0.1, metadata={"help": "relative std of the noise on each head copy (the "
                                                                "symmetry breaking of Mix-DPO)"})
    warmup_random_steps: int = field(default=0, metadata={"help": "Dirichlet-random E-step warm-up steps"})
    gate_rho: float = field(default=0.05, metadata={"help": "Mix-DPO closed-form weight update rate ρ"})
    gate_lr: float = field(default=5e-2, metadata={"help": "MoE gate lr"})
    gate_pretrain_steps: int = field(default=1000, metadata={
        "help": "MoE-DPO (contextual): supervised pre-training of the linear prompt gate on the domain label, then "
                "frozen (the paper's §4.2 classifier and its 'frozen gating layer' case)"})
    user_gate: bool = field(default=True, metadata={
        "help": "also train MoE-DPO K=3 gated on the annotator id (`user`) on the multi-reward task"})
    n_embd: int = field(default=64, metadata={"help": "tiny GPT-2 width"})
    n_layer: int = field(default=2, metadata={"help": "tiny GPT-2 depth"})
    num_samples: int = field(default=200, metadata={"help": "held-out prompts sampled per model (Tables 1, 2)"})
    stop_at_period: bool = field(default=True, metadata={
        "help": "samples end at the first '.' (a stop string; a review is one sentence): DPO-trained heads drive "
                "P(end-of-sequence) to about 0 on this data, so without it every sample runs to the token limit; "
                "the report prints each model's P(end | complete review)"})
    num_end_probe: int = field(default=100, metadata={"help": "held-out reviews for the P(end | review) column"})
    progress_bar: bool = field(default=True, metadata={"help": "the trainer's tqdm bar"})

    def __post_init__(self):
        for key in ("seeds", "workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"demo.{key} must be >= 1, got {getattr(self, key)}")
        if self.fast:
            self.num_train = self.num_train_contextual = self.num_sft = 800
            self.num_test, self.sft_steps, self.num_samples, self.user_gate = 200, 60, 80, False
            self.steps = self.ctx_steps = 80
            self.batch_size = self.ctx_batch_size = 32

    def budget(self, task: str, gate: str) -> tuple[int, int]:
        """(steps, pairs per step) of a run: Mix-DPO and its DPO baseline get `steps` × `batch_size`; the
        contextual runs and the annotator-id MoE-DPO `ctx_steps` × `ctx_batch_size`."""
        return (self.steps, self.batch_size) if task == "multi" and gate == "mix" else \
            (self.ctx_steps, self.ctx_batch_size)


def _say(msg: str, t0: float) -> None:
    print(f"[demo {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def run_config(cfg: DemoConfig, base_dir: str, train_path: str, run_dir: str, K: int, gate: str, seed: int,
               overrides: dict | None = None, task: str = "multi"):
    """The RunConfig of one demo run: K heads on the frozen SFT trunk, everything else shared by all runs.
    `overrides` (nested dict, e.g. {"em": {"mode": "gumbel"}}) is merged last (the ablation benchmark uses it)."""
    from mixdpo_ds.training.config import RunConfig, merge

    steps, batch_size = cfg.budget(task, gate)
    return RunConfig.from_dict(merge({
        "model": {"name_or_path": base_dir},
        "data": {"path": train_path, "max_length": 32, "max_prompt_length": 8},
        "experts": {"kind": "heads", "num_experts": K, "trunk": "frozen", "logprob_impl": "naive",
                    "init_noise": cfg.init_noise if K > 1 else 0.0},
        "gate": {"kind": gate, "features": "prompt", "arch": "linear", "lr": cfg.gate_lr, "rho": cfg.gate_rho},
        "em": {"mode": "exact", "posterior_correction": 1, "gate_update": "joint",
               "warmup_random_steps": cfg.warmup_random_steps if K > 1 else 0},
        "loss": {"beta": cfg.beta, "rpo_alpha": cfg.rpo_alpha},
        "train": {"output_dir": run_dir, "max_steps": steps, "micro_batch_size": batch_size,
                  "lr": cfg.lr, "log_every": 10, "keep_last": 1, "progress_bar": cfg.progress_bar,
                  "export": True, "plots": False, "seed": seed, "reference": "model"},
        "deepspeed": {"config": "zero0"},
    }, overrides or {}))


class ResponsibilityTrace(TrainerCallback):
    """Accumulates the training batches' responsibilities per group and step (the paper's Figures 1 and 3 log q_k
    per annotation style during training) into `trace`."""

    def __init__(self, trace: dict):
        self.trace = trace

    def on_step_end(self, trainer, step, record) -> None:
        groups, resp = record.cat_batch("group_ids").numpy(), record.cat("resp").float().cpu().numpy()
        G, K = self.trace["G"], resp.shape[1]
        sums, counts = np.zeros((G, K)), np.zeros(G)
        for g in range(G):
            sums[g] = resp[groups == g].sum(0)
            counts[g] = (groups == g).sum()
        self.trace["steps"].append(int(step) - 1)  # the step the responsibilities were computed at (0-based)
        self.trace["sums"].append(sums.tolist())
        self.trace["counts"].append(counts.tolist())


def train_and_evaluate(cfg: DemoConfig, base_dir: str, paths: dict, run_dir: str, K: int, gate: str, seed: int,
                       groups: list[str], overrides: dict | None = None, task: str = "multi") -> dict:
    """One run through the real trainer + `evaluate_run` on the held-out pairs; returns per-pair rows + trace."""
    from mixdpo_ds.training.evaluate import evaluate_run
    from mixdpo_ds.training.trainer import MixDPOTrainer

    trace = {"G": len(groups), "steps": [], "sums": [], "counts": [], "names": sorted(groups)}
    trainer = MixDPOTrainer(run_config(cfg, base_dir, paths["train"], run_dir, K, gate, seed, overrides, task),
                            callbacks=[ResponsibilityTrace(trace)])
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    summary = evaluate_run(run_dir, paths["test"], os.path.join(run_dir, "eval.jsonl"), batch_size=100)
    rows = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    return {"summary": summary, "rows": rows, "trace": trace}


def held_out_metrics(rows: list[dict], groups: list[str], K: int) -> dict:
    """Accuracies from evaluate's per-pair rows: mixture (p_mixture > 0.5) per group, every expert on every group,
    the best-permutation expert↔group matching of argmax resp (recovery), each group's matched expert's accuracy
    (routed), and the argmax-w routing confusion (MoE gate)."""
    from mixdpo_ds.core.collapse import collapse_metrics, collapse_report
    from mixdpo_ds.training.evaluate import recovery_accuracy

    gidx = np.array([groups.index(r["group"]) for r in rows])
    margins = np.array([r["margins"] for r in rows])  # (N, K)
    w = np.array([r["w"] for r in rows])
    pmix = np.array([r["p_mixture"] for r in rows])
    hit = np.where(margins > 0, 1.0, np.where(margins < 0, 0.0, 0.5))  # (N, K)
    mix_hit = np.where(pmix > 0.5, 1.0, np.where(pmix < 0.5, 0.0, 0.5))
    G = len(groups)
    rec = recovery_accuracy([r["expert"] for r in rows], gidx.tolist(), K, G)
    route = recovery_accuracy(w.argmax(1).tolist(), gidx.tolist(), K, G)
    out = {
        "mixture": {"all": float(mix_hit.mean()),
                    **{g: float(mix_hit[gidx == j].mean()) for j, g in enumerate(groups)}},
        "expert_by_group": [[float(hit[gidx == j, k].mean()) for j in range(G)] for k in range(K)],
        "recovery": rec["accuracy"],
        "mapping": {groups[g]: k for g, k in rec["mapping"].items()},
        "gate_routing": route["accuracy"],
        "gate_confusion": [[int(((gidx == j) & (w.argmax(1) == k)).sum()) for k in range(K)] for j in range(G)],
        "w_mean": w.mean(0).tolist(),
    }
    if K > 1:  # the collapse detectors' verdicts on the held-out pairs (core/collapse.py)
        tables = torch.tensor(margins), torch.tensor([r["resp"] for r in rows]), torch.tensor(w)
        health = collapse_report(*tables)
        out["collapse"] = {"merged": [list(p) for p in health["merged"]], "dead": health["dead"],
                           "saturated": health["saturated"],
                           "max_margin_corr": collapse_metrics(*tables)["collapse/max_margin_corr"]}
    out["routed"] = {g: out["expert_by_group"][k][groups.index(g)] for g, k in out["mapping"].items()}
    mapped = np.array([rec["mapping"].get(j, -1) for j in gidx])  # each pair's group's matched expert
    ok = mapped >= 0
    out["routed"]["all"] = float(hit[np.arange(len(rows))[ok], mapped[ok]].mean()) if ok.any() else float("nan")
    # "top-1 routed": each pair judged by its argmax-w expert (MoE-DPO's hard routing)
    top1 = hit[np.arange(len(rows)), w.argmax(1)]
    out["top1"] = {"all": float(top1.mean()), **{g: float(top1[gidx == j].mean()) for j, g in enumerate(groups)}}
    return out


def run_plan(cfg: DemoConfig) -> list[tuple[str, str, int, str, dict]]:
    """(name, task, K, gate kind, run-config overrides) of the demo's runs; same steps, batch and lr for all."""
    plan = [("mixdpo", "multi", 3, "mix", {}), ("dpo_multi", "multi", 1, "mix", {}),
            ("dpo_ctx", "contextual", 1, "mix", {}),
            ("moedpo", "contextual", 2, "moe", {"em": {"gate_update": "frozen"}, "gate": {
                "pretrain_steps": cfg.gate_pretrain_steps, "pretrain_label_column": "group"}})]
    if cfg.user_gate:
        plan.append(("moe_user", "multi", 3, "moe", {"gate": {"features": "user"}, "em": {"lambda_global": 1.0}}))
    return plan


# ------------------------------------------------------------------------------------------------ jobs
# The demo is a small DAG per seed: prepare (data + SFT) → one job per training run → sample (Tables 1/2). Jobs run
# in `cfg.workers` processes (spawned, one torch thread each) or, with workers=1, in this process; each job takes and
# returns plain picklable values, so both paths run the same code.

def prepare_seed(cfg: DemoConfig, seed: int, tokenizer_dir: str) -> dict:
    """Data of both tasks (+ Bayes ceilings) and the SFT warm-up of the tiny base model, for one seed."""
    from transformers import AutoTokenizer

    root = os.path.join(cfg.out, "runs", f"seed_{seed}")
    prep = {"seed": seed, "root": root, "tasks": {}}
    sft_rows = []
    for task in ("multi", "contextual"):
        n_train = cfg.num_train if task == "multi" else cfg.num_train_contextual
        rcfg = ReviewsConfig(task=task, num_train=n_train, num_test=cfg.num_test, num_sft=cfg.num_sft, seed=seed)
        paths = write_task(rcfg, os.path.join(root, "data", task))
        train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
        prep["tasks"][task] = {"paths": paths, "groups": rcfg.groups(), "test": test,
                               "contextual_rewards": rcfg.contextual_rewards,
                               "ceilings": bayes_ceilings(train[:cfg.ceiling_rows], test, rcfg)}
        sft_rows += read_jsonl(paths["sft"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prep["base_dir"], losses = build_tiny_base(os.path.join(root, "sft"), tokenizer, sft_rows,
                                               SFTConfig(steps=cfg.sft_steps, seed=seed), n_layer=cfg.n_layer,
                                               n_embd=cfg.n_embd, seed=seed)
    prep["sft_loss"] = [losses[0], losses[-1]]
    return prep


def run_job(cfg: DemoConfig, prep: dict, name: str, task: str, K: int, gate: str, overrides: dict) -> dict:
    """One training run of one seed through the real trainer, evaluated on the task's held-out pairs."""
    t1 = time.perf_counter()
    info = prep["tasks"][task]
    run_dir = os.path.join(prep["root"], name)
    res = train_and_evaluate(cfg, prep["base_dir"], info["paths"], run_dir, K, gate, prep["seed"], info["groups"],
                             overrides, task)
    return {"metrics": held_out_metrics(res["rows"], info["groups"], K), "trace": res["trace"],
            "export": os.path.join(run_dir, "export"), "eval": os.path.join(run_dir, "eval.jsonl"),
            "seconds": time.perf_counter() - t1}


def finish_seed(cfg: DemoConfig, prep: dict, runs: dict, tokenizer_dir: str) -> dict:
    """Samples from every expert scored by the annotators (Tables 1/2) and the seed's result record."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for res in runs.values():
        res["rows"] = read_jsonl(res["eval"])
    tasks = prep["tasks"]
    test = {"multi": tasks["multi"]["test"], "contextual": tasks["contextual"]["test"],
            "contextual_rewards": tasks["contextual"]["contextual_rewards"]}
    result = {"seed": prep["seed"], "sft_loss": prep["sft_loss"],
              **{task: {"groups": t["groups"], "ceilings": t["ceilings"]} for task, t in tasks.items()}}
    result["samples"] = sample_tables(prep["seed"], tokenizer, prep["base_dir"], runs, test,
                                      num_samples=cfg.num_samples, num_end_probe=cfg.num_end_probe,
                                      stop_at_period=cfg.stop_at_period)
    for name, res in runs.items():
        result[name] = {"metrics": res["metrics"], "trace": res["trace"], "seconds": res["seconds"]}
    return result


def _init_worker() -> None:
    torch.set_num_threads(1)
    _quiet()


class _Inline:
    """The executor interface on this process (workers=1): submit runs the job at once."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, **kwargs):
        pass


def run_all(cfg: DemoConfig, tokenizer_dir: str, t0: float) -> list[dict]:
    """Every seed's DAG on `cfg.workers` processes; longest runs are queued first. Returns results by seed."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    plan = run_plan(cfg)
    n_jobs = cfg.seeds * (len(plan) + 2)
    pool = _Inline() if cfg.workers == 1 else ProcessPoolExecutor(
        max_workers=cfg.workers, mp_context=get_context("spawn"), initializer=_init_worker)
    pending, preps, runs, results, done = {}, {}, {}, {}, 0
    try:
        for seed in range(cfg.seeds):
            pending[pool.submit(prepare_seed, cfg, seed, tokenizer_dir)] = ("prepare", seed, None)
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, seed, name = pending.pop(fut)
                value = fut.result()  # a failed job raises here, with its worker's traceback
                done += 1
                if kind == "prepare":
                    preps[seed], runs[seed] = value, {}
                    _say(f"[{done}/{n_jobs}] seed {seed}: data + SFT ready (SFT loss {value['sft_loss'][0]:.2f} → "
                         f"{value['sft_loss'][1]:.2f})", t0)
                    for run_name, task, K, gate, overrides in plan:
                        pending[pool.submit(run_job, cfg, value, run_name, task, K, gate, overrides)] = \
                            ("run", seed, run_name)
                elif kind == "run":
                    runs[seed][name] = value
                    m = value["metrics"]
                    _say(f"[{done}/{n_jobs}] seed {seed}: {name} held-out accuracy {m['mixture']['all']:.3f}, "
                         f"recovery {m['recovery']:.3f} ({value['seconds']:.1f}s)", t0)
                    if len(runs[seed]) == len(plan):
                        pending[pool.submit(finish_seed, cfg, preps[seed], runs[seed], tokenizer_dir)] = \
                            ("finish", seed, None)
                else:
                    results[seed] = value
                    _say(f"[{done}/{n_jobs}] seed {seed}: samples scored", t0)
    finally:
        pool.shutdown(cancel_futures=True)
    return [results[seed] for seed in range(cfg.seeds)]


def parse_args(argv: list[str] | None) -> DemoConfig:
    p = argparse.ArgumentParser(prog="mixdpo demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.getcwd(), "mixdpo_report"), help="report folder")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (mean ± sd over them)")
    p.add_argument("--fast", action="store_true", help="fewer steps and pairs (1 seed: ~1 minute)")
    p.add_argument("--steps", type=int, default=None, help="override the training steps of every run")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel processes, one torch thread each (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (with --workers 1)")
    a = p.parse_args(argv)
    cfg = DemoConfig(out=a.out, seeds=a.seeds, fast=a.fast, workers=a.workers,
                     progress_bar=not a.no_progress and a.workers == 1)
    if a.steps is not None:
        cfg.steps = cfg.ctx_steps = a.steps
    return cfg


def _quiet() -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mixdpo_ds"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mixdpo demo`; returns 0."""
    from mixdpo_ds.apps.report import write_report

    cfg = parse_args(argv)
    t0 = time.perf_counter()
    _quiet()
    # One intra-op thread: the tiny model's ops are far too small to split, and on a 2-core machine two threads
    # made an SFT step 10-15x slower (0.05 s → 0.5-0.9 s, measured) through thread contention.
    torch.set_num_threads(1)
    os.makedirs(cfg.out, exist_ok=True)
    tokenizer_dir = os.path.join(cfg.out, "runs", "tokenizer")
    build_review_tokenizer(tokenizer_dir)
    _say(f"{cfg.seeds} seed(s) × {len(run_plan(cfg))} runs on {cfg.workers} process(es); report in {cfg.out}", t0)
    results = run_all(cfg, tokenizer_dir, t0)
    elapsed = time.perf_counter() - t0
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "seconds": elapsed, "results": results}, f)
    path = write_report(cfg.out, results, asdict(cfg), elapsed)
    _say(f"done in {elapsed:.1f}s ({elapsed / 60:.2f} min); report: {path}", t0)
    return 0
