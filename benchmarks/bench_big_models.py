"""Billion-parameter policies end to end on CPU ranks: train, checkpoint, kill, resume, export, reload; memory.

    python benchmarks/bench_big_models.py heads    # 1.11 B GPT-2 shape, K = 3 heads on the frozen trunk
    python benchmarks/bench_big_models.py lora     # the same base, K = 4 LoRA experts
    python benchmarks/bench_big_models.py trunk    # 354 M GPT-2 medium shape, K = 3 heads, trainable trunk,
                                                   # gradient checkpointing on and off
    add --append benchmarks/RESULTS.md to append the report; --work DIR keeps the models between calls.

Each scenario builds its model from a config (random init, `save_pretrained`, no hub) and runs `MixDPOTrainer`
through the real `deepspeed` launcher on 2 CPU ranks at ZeRO-3 (gloo), on the project's small local preference file:
1. a run that checkpoints at step 2 and is SIGKILLed once that checkpoint is complete;
2. the same command again: it resumes from step 2, trains to the end, checkpoints and exports;
3. this process loads each exported expert with `from_pretrained` (one at a time) and scores the batch the run
   scored with its engine at the end (the in-training log-probs): the largest relative difference is reported;
4. the same model on 1 rank (ZeRO-3 at world size 1), trained 2 steps, for the per-rank comparison.
Memory per rank comes from `run_dir/memory/rank{r}.json` (training/memory.py): the exact bytes of the rank's
parameter partitions, optimizer states and master weights, and the peak RSS of each stage (loading, training,
export); `mixdpo plan`'s estimate (training/plan.py) is printed beside the training peak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_scaling import commit, machine  # noqa: E402

DATA = ROOT / "tests" / "data" / "hh_rlhf_relabeled_sample.jsonl"
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "prompt_last_index")
SHAPES = {  # GPT-2 shapes: 1.11 B (20 × 2048) and 354 M (GPT-2 medium, 24 × 1024), V = 50,257
    "1b": dict(n_layer=20, n_embd=2048, n_head=16, n_positions=128),
    "350m": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=128),
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=128),  # the `smoke` scenario: checks this script
}
COMMON = ["deepspeed.config=zero3", "train.gradient_clipping=0", "train.plots=false", "train.progress_bar=false",
          "train.log_every=1", "train.keep_last=1", "train.eval_every=0", "data.group_column=objective",
          f"data.path={DATA}", "loss.beta=0.1", "train.lr=1e-4", "train.export_max_shard_size=500MB",
          "train.resume_from=auto"]  # the relaunch after the kill resumes from the newest complete checkpoint
SCENARIOS = {
    "heads": ("1b", ["experts.kind=heads", "experts.num_experts=3", "experts.trunk=frozen", "experts.init_noise=0.01",
                     "train.micro_batch_size=2", "data.max_length=64", "data.max_prompt_length=48",
                     "train.max_steps=4", "train.save_every=2"], {}),
    "lora": ("1b", ["experts.kind=lora", "experts.num_experts=4", "experts.lora_r=8", "experts.init_noise=0.5",
                    "train.micro_batch_size=1", "data.max_length=40", "data.max_prompt_length=24",
                    "train.max_steps=3", "train.save_every=2"], {}),
    "trunk": ("350m", ["experts.kind=heads", "experts.num_experts=3", "experts.trunk=trainable",
                       "experts.init_noise=0.01", "train.micro_batch_size=2", "data.max_length=128",
                       "data.max_prompt_length=64", "train.max_steps=3", "train.save_every=2"],
              {"gc_off": ["train.gradient_checkpointing=false"],
               "glibc_heap": ["train.host_mmap_threshold_mb=0"]}),  # glibc's own threshold: freed pages stay
    "smoke": ("tiny", ["experts.kind=heads", "experts.num_experts=2", "train.micro_batch_size=2",
                       "data.max_length=64", "data.max_prompt_length=48", "train.max_steps=4", "train.save_every=2"],
              {}),
}


# ------------------------------------------------------------------------------------------------ worker (ranks)
def worker(out: str, overrides: list[str]) -> None:
    """One training run on this rank; at the end, the engine's (2B, K) log-probs of a fixed batch (gathered)."""
    from mixdpo_ds.training import distributed as mdist
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(None, [f"train.output_dir={out}", *overrides])
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    trainer.train()
    world, rank = mdist.world_size(), mdist.rank()
    examples = trainer.data.train[: 2 * world]
    batch = trainer._collate(mdist.shard(examples, rank, world))
    trainer.engine.eval()
    with torch.no_grad():
        logps = trainer.engine(**{k: batch[k] for k in MODEL_KEYS}).logps  # (2·2, K) this rank's rows
    parts = [torch.empty_like(logps) for _ in range(world)]
    torch.distributed.all_gather(parts, logps.contiguous())
    if rank == 0:
        torch.save({"logps": parts, "batches": [trainer._collate(mdist.shard(examples, r, world)) for r in
                                                range(world)]}, Path(out) / "final_logps.pt")
    trainer.cleanup()
    mdist.barrier()


# ------------------------------------------------------------------------------------------------ driver
def build_model(shape: str, work: Path) -> Path:
    """GPT-2 of `shape` with random init and the tiny local tokenizer, saved once under work/shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixdpo_ds.apps.tiny import build_tiny_tokenizer

    path = work / f"gpt2-{shape}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **SHAPES[shape]))
    print(f"built {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters", flush=True)
    tmp = work / f".tmp-{shape}"
    model.save_pretrained(tmp)
    build_tiny_tokenizer(str(tmp))
    del model
    os.replace(tmp, path)
    return path


def _launch(ranks: int, out: Path, overrides: list[str], kill_at_step: int | None = None) -> dict:
    """Run the worker on `ranks` CPU ranks; with kill_at_step, SIGKILL it once that checkpoint is complete."""
    from mixdpo_ds.training.checkpoint import list_checkpoints

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", str(ranks), "--master_port",
           str(port), "--no_local_rank", __file__, "--worker", str(out), *overrides]
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / f"launcher_{int(t0)}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        while proc.poll() is None:
            time.sleep(0.5)
            if kill_at_step and any(step == kill_at_step for step, _ in list_checkpoints(out)):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        leftover.unlink(missing_ok=True)  # a killed rank cannot remove its CPU all-reduce buffer
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log: {log.name}\n"
                           + Path(log.name).read_text()[-4000:])
    memory = {p.stem: json.loads(p.read_text()) for p in sorted((out / "memory").glob("rank*.json"))}
    resumed = re.search(r"resumed from \S+ at step (\d+)", Path(log.name).read_text())
    return {"wall_s": time.time() - t0, "killed": killed, "memory": memory,
            "checkpoints": [step for step, _ in list_checkpoints(out)],
            "resumed_from": int(resumed.group(1)) if resumed else None,  # the trainer's log line on rank 0
            "tokens_per_s": [r["tokens_per_s"] for r in _steps(out) if "tokens_per_s" in r]}  # the run's steps so far


def _steps(out: Path) -> list[dict]:
    if not (out / "metrics.jsonl").exists():
        return []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def export_check(out: Path) -> float:
    """max |engine − exported| / max(1, |engine|) over the final batch's (2B, K) log-probs, each expert loaded on
    its own (`export.load_expert`: `from_pretrained`, a LoRA adapter merged into its base)."""
    from mixdpo_ds.training.export import load_expert

    saved = torch.load(out / "final_logps.pt", weights_only=False)
    worst = 0.0
    K = saved["logps"][0].shape[1]
    for k in range(K):
        model = load_expert(str(out / "export"), k)
        with torch.no_grad():
            for batch, engine in zip(saved["batches"], saved["logps"], strict=True):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
                tok = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
                mine = (tok * (labels != -100)).sum(-1)
                worst = max(worst, ((mine - engine[:, k]).abs() / engine[:, k].abs().clamp(min=1.0)).max().item())
        del model
    return worst


def _plan_mib(overrides: list[str], world: int) -> float | None:
    try:
        from mixdpo_ds.training.config import load_config
        from mixdpo_ds.training.plan import plan_memory
    except ImportError:
        return None
    plan = plan_memory(load_config(None, overrides), world)
    return plan.total / 2**20


def _mib(b) -> str:
    return f"{b / 2**20:,.0f}" if b is not None else "–"


def _row(name: str, ranks: int, res: dict, plan: float | None) -> str:
    ranks_mem = list(res["memory"].values())
    setup = [m.get("setup", {}) for m in ranks_mem]
    trained = [m.get("trained", {}) for m in ranks_mem]
    exported = [m.get("exported", {}) for m in ranks_mem]

    def worst(entries, key):
        vals = [e.get(key) for e in entries if e.get(key) is not None]
        return max(vals) if vals else None

    state = [b for b in (_state_bytes(e) for e in trained) if b is not None]
    peak_train = worst(trained, "peak_rss_mib")
    return (f"| {name} | {ranks} | {_mib(max(state) if state else None)} | "
            f"{worst(setup, 'peak_rss_mib') or 0:,.0f} | {peak_train or 0:,.0f} | "
            f"{worst(exported, 'peak_rss_mib') or 0:,.0f} | "
            f"{f'{plan:,.0f}' if plan else '–'} | "
            f"{f'{peak_train / plan:.2f}' if plan and peak_train else '–'} | {_tokens(res)} | {res['wall_s']:.0f} |")


def _tokens(res: dict) -> str:
    """Mean tokens/s of the steps after the first (the first pays the set-up's page faults), all ranks."""
    tps = res.get("tokens_per_s") or []
    tps = tps[1:] if len(tps) > 1 else tps
    return f"{sum(tps) / len(tps):.1f}" if tps else "–"


def run_scenario(name: str, work: Path, kill: bool = True, one_rank: bool = True,
                 variant_ranks: int = 2, only: list[str] | None = None) -> tuple[list[str], dict]:
    shape, overrides, variants = SCENARIOS[name]
    variants = {k: v for k, v in variants.items() if only is None or k in only}
    model = build_model(shape, work)
    base = [*COMMON, f"model.name_or_path={model}", *overrides]
    out = work / f"run-{name}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    killed = _launch(2, out, base, kill_at_step=2) if kill else {"killed": None}
    resumed = _launch(2, out, base)
    steps = _steps(out)
    diff = export_check(out)
    rows = [_row("2 ranks, resumed run" if kill else "2 ranks", 2, resumed, _plan_mib(base, 2))]
    one = None
    if one_rank:
        one = _launch(1, work / f"run-{name}-1rank", [*base, "train.max_steps=2", "train.save_every=0",
                                                          "train.export=false"])
        rows.append(_row("1 rank", 1, one, _plan_mib(base, 1)))
    extra = {}
    for vname, vover in variants.items():
        res = _launch(variant_ranks, work / f"run-{name}-{vname}", [*base, *vover, "train.max_steps=2",
                                                                    "train.save_every=0", "train.export=false"])
        rows.append(_row(f"{variant_ranks} rank(s), {vname}", variant_ranks, res,
                         _plan_mib([*base, *vover], variant_ranks)))
        extra[vname] = res
    summary = {"killed_after_checkpoint": killed["killed"], "resumed_from": resumed["resumed_from"],
               "resumed_steps": [r["step"] for r in steps],
               "losses": [round(r["loss"], 6) for r in steps], "export_max_rel_diff": diff,
               "state_ratio_2_vs_1": _state_ratio(resumed, one) if one else None,
               "activation": _activation(resumed if variant_ranks == 2 else one, extra)}
    return rows, summary


def _state_bytes(entry: dict) -> int | None:
    """Parameters (this rank's partitions) + optimizer states + master weights, at the end of training (a plain
    torch AdamW creates its states at the first step, ZeRO's at set-up)."""
    if "param_bytes" not in entry:
        return None
    return entry["param_bytes"] + entry["optimizer_state_bytes"] + entry["master_weight_bytes"]


def _state(res: dict) -> float:
    return max(_state_bytes(m["trained"]) for m in res["memory"].values())


def _state_ratio(two: dict, one: dict) -> float:
    return _state(two) / _state(one)


def _activation(on: dict, extra: dict) -> dict | None:
    """Training-phase peak RSS above the RSS once training is over (which still holds parameters, gradients and
    optimizer states: what is gone is the activations), with and without gradient checkpointing (worst rank)."""
    if "gc_off" not in extra:
        return None

    def act(res):
        return max(m["trained"]["peak_rss_mib"] - m["trained"]["rss_mib"] for m in res["memory"].values())
    return {"gc_on_mib": act(on), "gc_off_mib": act(extra["gc_off"]), "ratio_off_over_on":
            act(extra["gc_off"]) / max(act(on), 1e-9)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--work", default="/tmp/mixdpo_big")
    p.add_argument("--append", default=None)
    p.add_argument("--no-kill", action="store_true", help="one uninterrupted run instead of kill + resume")
    p.add_argument("--no-one-rank", action="store_true", help="skip the 1-rank comparison run")
    p.add_argument("--variant-ranks", type=int, choices=(1, 2), default=2,
                   help="ranks of the variant runs (trunk: checkpointing off); 1 compares them with the 1-rank run")
    p.add_argument("--variants", default=None, help="comma-separated variant runs (trunk: gc_off, glibc_heap); "
                                                     "default: all of the scenario's")
    args = p.parse_args(argv)
    only = args.variants.split(",") if args.variants is not None else None
    unknown = sorted(set(only or []) - set(SCENARIOS[args.scenario][2]))
    if unknown:
        p.error(f"--variants {unknown}: the {args.scenario} scenario has {sorted(SCENARIOS[args.scenario][2])}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.variant_ranks == 1 and args.no_one_rank:
        p.error("--variant-ranks 1 compares the variants with the 1-rank run: drop --no-one-rank")
    rows, summary = run_scenario(args.scenario, work, kill=not args.no_kill, one_rank=not args.no_one_rank,
                                 variant_ranks=args.variant_ranks, only=only)
    shape, overrides, _ = SCENARIOS[args.scenario]
    report = "\n".join([
        f"### Big models on CPU ranks: {args.scenario} — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}; commit: {commit()}",
        f"- command: `python benchmarks/bench_big_models.py {' '.join(sys.argv[1:])}`; GPT-2 {shape} "
        f"({SHAPES[shape]}, V = 50,257, random init), ZeRO-3, fp32, {' '.join(overrides)}; "
        f"whole command {time.time() - t0:.0f} s",
        "",
        "| run | ranks | params + optimizer states per rank (MiB, exact) | peak RSS loading | peak RSS training | "
        "peak RSS export | plan estimate (MiB) | training peak / plan | tokens/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        (f"Checkpoint at step 2, SIGKILL, resume: killed {summary['killed_after_checkpoint']}, the relaunch "
         f"logged 'resumed from … at step {summary['resumed_from']}'. "
         if not args.no_kill else "One uninterrupted run (no kill). ")
        + f"Steps logged {summary['resumed_steps']}, losses {summary['losses']}. Exported experts loaded with "
        f"from_pretrained: max relative log-prob difference to the engine {summary['export_max_rel_diff']:.2e}."
        + (f" Per-rank parameter + optimizer bytes, 2 ranks / 1 rank: {summary['state_ratio_2_vs_1']:.3f}."
           if summary["state_ratio_2_vs_1"] else "")
        + (f" Activations (training-phase peak RSS above the RSS after training, worst rank): checkpointing on "
           f"{summary['activation']['gc_on_mib']:.0f} MiB, off {summary['activation']['gc_off_mib']:.0f} MiB "
           f"(off / on = {summary['activation']['ratio_off_over_on']:.1f})." if summary["activation"] else ""),
        ""])
    print(report)
    print(json.dumps(summary))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        from mixdpo_ds.training import distributed as mdist

        mdist.init_distributed()
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
