"""`mixdpo plan`'s estimate against the measured peak RSS of real CPU trainings (docs/scaling.md "Checked").

    python benchmarks/bench_plan.py                                   # all configurations, prints the table
    python benchmarks/bench_plan.py --runs heads_frozen_z0 --append benchmarks/RESULTS.md

A GPT-2 12 × 768, V = 50,257 (random init from a config, save_pretrained into a temp dir, a tiny tokenizer)
trains 3 steps on tests/data/hh_rlhf_relabeled_sample.jsonl (rows truncated to data.max_length) per configuration:
K = 3 heads on the frozen trunk and on a trainable trunk (with and without gradient checkpointing), ZeRO-0 on
1 rank (`python -m mixdpo_ds.cli train`), and on the frozen trunk ZeRO-3 on 2 ranks
(`deepspeed --num_accelerators 2 --module mixdpo_ds.cli train`). Each rank's peak RSS is the larger of its
VmHWM polled from /proc and the ru_maxrss it prints at the end (MIXDPO_PRINT_PEAK_RSS=1).
The plan's runtime row is the peak RSS of a process that imported torch, transformers and deepspeed, measured in
the same run. The whole process is measured: set-up (from_pretrained), the steps and the final checkpoint save.

`run_and_measure(cmd, ...)` is importable: any command, the peak RSS of each of its rank processes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_scaling import commit, machine  # noqa: E402

_PRINTED = re.compile(r"MIXDPO_PEAK_RSS rank=(\d+) kib=(\d+)")
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
RUNS = {  # name -> (ranks, overrides)
    "heads_frozen_z0": (1, ["experts.trunk=frozen", "deepspeed.config=zero0"]),
    "heads_trainable_z0": (1, ["experts.trunk=trainable", "deepspeed.config=zero0"]),       # checkpointing: auto (on)
    "heads_trainable_z0_nockpt": (1, ["experts.trunk=trainable", "deepspeed.config=zero0",
                                      "train.gradient_checkpointing=false"]),
    "heads_frozen_z3": (2, ["experts.trunk=frozen", "deepspeed.config=zero3"]),
}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _status_kib(pid: int, key: str = "VmHWM") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_rank(argv: list[str], module: str) -> bool:
    """A rank runs `python -m <module>` (the launcher's own command line only names the module after --module)."""
    return any(a == "-m" and b == module for a, b in zip(argv, argv[1:], strict=False))


def run_and_measure(cmd: list[str], module: str = "mixdpo_ds.cli", env: dict | None = None, cwd=ROOT,
                    poll_s: float = 0.2, timeout_s: float = 3600) -> list[int]:
    """Run `cmd` to the end; -> each rank's peak RSS in bytes, in rank order (ranks: the processes of the tree that
    run `python -m module`). Per rank: max(VmHWM polled from /proc, the `MIXDPO_PEAK_RSS rank=R kib=N` line it
    prints, the env var MIXDPO_PRINT_PEAK_RSS=1 is set here). Raises RuntimeError on a failed command."""
    env = {**{k: v for k, v in (env or os.environ).items() if k not in DIST_VARS}, "MIXDPO_PRINT_PEAK_RSS": "1"}
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    polled: dict[int, int] = {}       # pid -> VmHWM KiB
    start = time.monotonic()
    while proc.poll() is None:
        for pid in [proc.pid, *_children(proc.pid)]:
            if _is_rank(_argv(pid), module) and (kib := _status_kib(pid)) is not None:
                polled[pid] = max(polled.get(pid, 0), kib)
        if time.monotonic() - start > timeout_s:
            proc.kill()
        time.sleep(poll_s)
    log.seek(0)
    out = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    printed = {int(r): int(k) for r, k in _PRINTED.findall(out)}
    by_pid = [polled[p] for p in sorted(polled)]          # pids grow with start order: the launcher starts rank 0 first
    n = max(len(printed), len(by_pid))
    return [1024 * max(printed.get(r, 0), by_pid[r] if r < len(by_pid) else 0) for r in range(n)]


def baseline_rss() -> int:
    """Peak RSS (bytes) of a process that imported torch, transformers and deepspeed: the plan's runtime row."""
    code = ("import resource, torch, transformers, deepspeed; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.split()[-1]) * 1024


def build_model(out: str, layers: int, hidden: int, vocab: int) -> None:
    """A seeded GPT-2 of that size saved with save_pretrained, and the tiny tokenizer beside it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixdpo_ds.apps.tiny import build_tiny_tokenizer

    build_tiny_tokenizer(out)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=hidden // 64, vocab_size=vocab, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(out)


def train_command(ranks: int, overrides: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "mixdpo_ds.cli", "train", *overrides]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", str(ranks), "--master_port",
            str(port), "--module", "mixdpo_ds.cli", "train", *overrides]


def _shm_files() -> set[str]:
    return {str(p) for p in Path("/dev/shm").glob("deepspeed_*")}


def measure(name: str, model: str, work: Path, args, runtime: int) -> dict:
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.plan import plan_memory

    ranks, extra = RUNS[name]
    overrides = [f"model.name_or_path={model}", f"train.output_dir={work / name}", "train.export=false",
                 f"train.max_steps={args.steps}", "train.plots=false", "train.save_every=0",
                 f"train.micro_batch_size={args.micro_batch}", f"data.max_length={args.max_length}",
                 f"data.max_prompt_length={args.max_length // 2}", f"experts.num_experts={args.experts}", *extra]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    plan = plan_memory(cfg, ranks, runtime_bytes=runtime)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    peaks = run_and_measure(train_command(ranks, ["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]),
                            env=env)
    stages = stage_peaks(work / name, ranks)
    # the trainer resets VmHWM after each memory report: the whole run's peak is the largest stage peak
    peaks = [max(p, *(1024**2 * v for v in st.values())) for p, st in zip(peaks, stages, strict=False)]
    shutil.rmtree(work / name, ignore_errors=True)
    return {"name": name, "ranks": ranks, "plan": plan, "peaks": peaks, "stages": stages,
            "wall_s": time.monotonic() - t0}


def stage_peaks(run_dir: Path, ranks: int) -> list[dict[str, float]]:
    """Per rank {stage: peak RSS MiB since the previous stage} from the run's memory/rank{r}.json (written by the
    trainer: "setup", "trained" (the steps, the final evaluation and checkpoint), "exported"); {} when absent."""
    import json

    out = []
    for r in range(ranks):
        path = run_dir / "memory" / f"rank{r}.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        out.append({k: v["peak_rss_mib"] for k, v in report.items() if v.get("peak_rss_mib") is not None})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--append", default=None, help="append the markdown section to this file")
    args = p.parse_args(argv)

    shm_before, started = _shm_files(), datetime.datetime.now(datetime.timezone.utc)
    runtime = baseline_rss()
    print(f"runtime baseline (torch + transformers + deepspeed imported): {runtime / 2**20:.0f} MiB", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        model = f"{tmp}/gpt2"
        build_model(model, args.layers, args.hidden, args.vocab)
        for name in args.runs:
            results.append(measure(name, model, Path(tmp), args, runtime))
            r = results[-1]
            print(name, [round(b / 2**20) for b in r["peaks"]], round(r["plan"].total / 2**20), r["stages"],
                  flush=True)
    for f in _shm_files() - shm_before:     # gloo's shared-memory buffers of our ranks
        os.remove(f)
    section = report(results, runtime, args, started)
    print(section)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + section + "\n")


def report(results: list[dict], runtime: int, args, started) -> str:
    from mixdpo_ds.training.plan import format_plan

    argv = " ".join(sys.argv[1:])
    lines = [f"### bench_plan: `mixdpo plan` vs measured peak RSS — {started:%Y-%m-%d %H:%M} UTC", "",
             f"- machine: {machine()}", f"- commit: {commit()}", f"- command: `python benchmarks/bench_plan.py {argv}`",
             "", f"GPT-2 {args.layers} × {args.hidden}, V = {args.vocab:,} (random init), K = {args.experts} heads, "
             f"fp32, {args.steps} steps of {args.micro_batch} pairs × {args.max_length} tokens per rank, "
             "train.export=false (the final checkpoint is written). Runtime row = measured baseline "
             f"{runtime / 2**20:.0f} MiB (a process that imported torch + transformers + deepspeed). Measured: "
             "each rank's whole-process peak RSS.", "",
             "| run | ranks | plan MiB/rank | measured MiB/rank (each rank) | measured / plan | set-up / steps + save "
             "peak MiB (rank 0) | wall s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        plan = r["plan"].total / 2**20
        measured = [b / 2**20 for b in r["peaks"]]
        ratio = ", ".join(f"{m / plan:.2f}" for m in measured)
        lines.append(f"| {r['name']} | {r['ranks']} | {plan:.0f} | {', '.join(f'{m:.0f}' for m in measured)} | "
                     f"{ratio} | {_stages(r['stages'][0])} | {r['wall_s']:.0f} |")
    lines += ["", "Plans (rows in MiB):", ""]
    for r in results:
        lines += ["```", format_plan(r["plan"]), "```"]
    return "\n".join(lines)


def _stages(stages: dict) -> str:
    return " / ".join(f"{stages[k]:.0f}" for k in ("setup", "trained") if k in stages) or "n/a"


if __name__ == "__main__":
    main()
