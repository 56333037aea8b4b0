"""Fault injection: N random SIGKILLs over one `mixdpo train` run, each followed by `train.resume_from=auto`.

    python benchmarks/bench_faults.py                          # 5 kills, prints the report
    python benchmarks/bench_faults.py --kills 8 --seed 1 --append benchmarks/RESULTS.md

One uninterrupted reference run, then the same run in a fresh directory, killed with SIGKILL at a random moment
(a uniform 0-1 s after it has trained a new step: mid-step, mid-checkpoint, mid-export) and resumed, until it
finishes. Reported:
whether the final export and the per-step metrics equal the uninterrupted run's (bitwise), and per kill the steps
lost: the last step the killed process had logged minus the step it resumed from (at most one `save_every`).
A tiny GPT-2 (K = 2 heads, MoE gate, Gumbel E-step: every piece of state that must survive a resume), one process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 200, 10
RUN = ["experts.num_experts=2", "gate.kind=moe", "gate.lr=0.05", "em.mode=gumbel", "train.lr=1e-2",
       f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.keep_last=2", "train.resume_from=auto",
       "train.plots=false", "train.progress_bar=false", "data.max_length=48", "data.max_prompt_length=24",
       "data.group_column=group"]


def _setup(work: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from conftest import synthetic_rows

    from mixdpo_ds.apps.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(str(work / "tok"))
    model = build_tiny_model(str(work / "model"), tok, n_layer=2, n_embd=32, seed=0)
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    return model, str(data)


def _cmd(model: str, data: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "mixdpo_ds.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"model.name_or_path={model}", f"data.path={data}", f"train.output_dir={out}", *RUN]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "eval/loss" not in r]


def _trained_since(out: Path, launched: float, start: int) -> bool:
    """The process started at `launched` has logged a step past `start` (rows left by a killed predecessor are
    older than `launched`; the resumed process drops them when it starts)."""
    path = out / "metrics.jsonl"
    return path.exists() and path.stat().st_mtime > launched and \
        max([r["step"] for r in _steps(out)], default=0) > start


def _last_checkpoint(out: Path) -> int:
    """The step a resume would start from (0: none)."""
    from mixdpo_ds.training.checkpoint import find_latest

    found = find_latest(out) if (out / "checkpoints").exists() else None
    return int(found.name.removeprefix(".old_").removeprefix("step_")) if found else 0


def _export(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "export").rglob("*.safetensors"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", default=None, help="append the report to this markdown file")
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = _setup(work)
        t0 = time.time()
        subprocess.run(_cmd(model, data, work / "ref"), env=_env(), check=True, capture_output=True)
        duration = time.time() - t0
        ref_steps, ref_export = _steps(work / "ref"), _export(work / "ref")
        out, lost, kills = work / "killed", [], 0
        while True:
            start, launched = _last_checkpoint(out), time.time()
            proc = subprocess.Popen(_cmd(model, data, out), env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            if kills < args.kills:  # kill while it trains: after this process logged a new step, at a random moment
                while proc.poll() is None and not _trained_since(out, launched, start):
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 1.0))
            if kills < args.kills and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                lost.append(max([r["step"] for r in _steps(out)], default=0) - _last_checkpoint(out))
                continue
            assert proc.wait() == 0, "the resumed run failed"
            break
        got_steps = _steps(out)
        same_metrics = [r["step"] for r in got_steps] == [r["step"] for r in ref_steps] and all(
            a["loss"] == b["loss"] and a["gate_loss"] == b["gate_loss"]
            for a, b in zip(got_steps, ref_steps, strict=True))
        same_export = _export(out) == ref_export
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = (f"\n## Fault injection: SIGKILL + resume ({datetime.date.today()}, commit {commit})\n\n"
              f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; command: "
              f"`python benchmarks/bench_faults.py --kills {args.kills} --seed {args.seed}`. Run: {STEPS} steps, "
              f"checkpoint every {SAVE_EVERY}, uninterrupted {duration:.1f} s.\n\n"
              f"| kills | resumed metrics == uninterrupted (bitwise) | export == uninterrupted (bitwise) | "
              f"steps lost per kill | worst |\n|---|---|---|---|---|\n"
              f"| {kills} | {'yes' if same_metrics else 'NO'} | {'yes' if same_export else 'NO'} | "
              f"{', '.join(map(str, lost))} | {max(lost, default=0)} (save_every {SAVE_EVERY}) |\n")
    print(report)
    if args.append:
        with open(args.append, "a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
