"""Throughput and per-rank memory of `mixdpo train` on 1, 2, 4 CPU ranks: dense heads vs expert parallel.

    python benchmarks/bench_scaling.py                                  # ranks 1 2 4, prints the table
    python benchmarks/bench_scaling.py --ranks 1 2 --steps 6 --append benchmarks/RESULTS.md

Each configuration is one `deepspeed --num_accelerators N` start of this file with `--worker`, which runs
`MixDPOTrainer` on a tiny GPT-2 (K heads, frozen trunk, ZeRO-2, fp32) for `--steps` steps of one fixed
global batch (strong scaling: micro batch = global / N). Reported per configuration: tokens/s (the trainer's
`tokens_per_s`, all ranks, mean over the steps after the first), the heads' parameter bytes per rank, and
each rank's peak RSS (whole process: Python, torch, DeepSpeed, data; the heads are a small part of it at
this size). Expert parallel uses ep_size = N (K/N heads per rank), so it needs N > 1 and N | K.
The baseline of each row's ratio is dense at the same rank count, measured in the same run.
On a 2-core machine 4 ranks oversubscribe the cores: read those rows as a correctness/overhead check.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(out: str, model: str, overrides: list[str]) -> None:
    """Runs under the launcher: train, then rank 0 writes {tokens_per_s, head bytes, peak RSS per rank}."""
    import torch

    from mixdpo_ds.model.parallel import head_param_bytes
    from mixdpo_ds.training import distributed as mdist
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    torch.set_num_threads(1)
    mdist.init_distributed()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.name_or_path={model}", f"train.output_dir={out}/run", "train.progress_bar=false",
        "train.plots=false", "train.export=false", "train.save_every=0", "train.gradient_clipping=0",
        "deepspeed.config=zero2", *overrides])
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    trainer.train()
    mine = torch.tensor([head_param_bytes(trainer.engine.module),
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(mdist.world_size())]
    torch.distributed.all_gather(parts, mine)
    if mdist.rank() == 0:
        metrics = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
        tok_s = [m["tokens_per_s"] for m in metrics[1:]] or [metrics[0]["tokens_per_s"]]
        result = {"tokens_per_s": sum(tok_s) / len(tok_s), "head_bytes": [int(p[0]) for p in parts],
                  "peak_rss_mib": [round(float(p[1]) / 2**20, 1) for p in parts]}
        (Path(out) / "result.json").write_text(json.dumps(result))
    trainer.cleanup()


def launch(ranks: int, model: str, overrides: list[str], work: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [__file__, "--worker", str(work), model, *overrides]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", str(ranks), "--master_port",
           str(port), "--no_local_rank", *args]
    # a process group of this process (e.g. under pytest) must not leak its RANK / MASTER_PORT into the ranks
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads((work / "result.json").read_text())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at start"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "no commit"
    return head + (" + uncommitted changes" if git("status", "--porcelain") else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--experts", type=int, default=4, help="K heads")
    p.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step, all ranks together")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--append", default=None, help="append the markdown section to this file")
    args = p.parse_args(argv)

    from mixdpo_ds.apps.tiny import build_tiny_model, build_tiny_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = f"{tmp}/tiny"
        build_tiny_model(model, build_tiny_tokenizer(model))
        for n in args.ranks:
            base = [f"experts.num_experts={args.experts}", f"train.max_steps={args.steps}",
                    f"train.micro_batch_size={args.global_batch // n}"]
            modes = [("dense", [])] + ([("expert parallel", [f"experts.ep_size={n}"])]
                                       if n > 1 and args.experts % n == 0 else [])
            dense = None
            for name, extra in modes:
                work = Path(tmp) / f"{name.replace(' ', '_')}_{n}"
                work.mkdir()
                r = launch(n, model, base + extra, work)
                dense = dense or r
                rows.append((n, name, r, r["tokens_per_s"] / dense["tokens_per_s"],
                             r["head_bytes"][0] / dense["head_bytes"][0]))
                print(rows[-1], flush=True)

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### bench_scaling — {now}", "",
             f"- machine: {machine()}", f"- commit: {commit()}",
             f"- command: `python benchmarks/bench_scaling.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- setup: tiny GPT-2 (2 layers, H=32), K={args.experts} heads on a frozen trunk, ZeRO-2, fp32, global "
             f"batch {args.global_batch} pairs, {args.steps} steps (tokens/s: mean of steps 2..{args.steps})", "",
             "| ranks | heads | tokens/s | vs dense | head bytes / rank | vs dense | peak RSS / rank (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for n, name, r, speed, mem in rows:
        lines.append(f"| {n} | {name} | {r['tokens_per_s']:.0f} | {speed:.2f} | {r['head_bytes'][0]} | {mem:.2f} | "
                     f"{', '.join(str(x) for x in r['peak_rss_mib'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
