"""mixdpo-ds against TRL's DPOTrainer on the same model, data and batch: step time, tokens/s, peak memory.

    python benchmarks/bench_vs_trl.py --rounds 3 --steps 6            # V = 50,257; ~15 min on 2 shared cores
    python benchmarks/bench_vs_trl.py --vocab 4000 --rounds 3         # a small vocabulary
    python benchmarks/bench_vs_trl.py --rounds 3 --configs "mixdpo K=1, trunk frozen" "mixdpo K=3 r=16, trunk frozen"
    add --append benchmarks/RESULTS.md to append the table (machine, commit, date, command).

Model: a randomly initialised GPT-2 (4 layers × 256, the given vocabulary; no hub) over a local byte-level BPE
tokenizer (only the model's vocabulary size sets the LM-head cost). Data: 8 pairs per step, prompts of about 60
tokens and responses of about 60 (≤ 128 tokens a row, nothing truncated), fp32, one process, 2 torch threads.
Configurations: TRL 1.16 DPOTrainer (sigmoid loss, the whole model trains, reference model in memory); mixdpo K = 1
with a trainable trunk (the tied head stays tied: TRL's DPO exactly) and with a frozen trunk; mixdpo K = 3 heads on
a frozen trunk; and the trainer's own paths (`--configs` picks them; the first listed is the baseline of the ratios):
the default `loss.fused=auto` (the policy loss inside the heads' forward, no recompute) against `never` (chunked
log-probs, then the loss) and the naive path, for full and low-rank (`experts.head_rank`) heads. Each runs in its
own process: s / step = median over the steps after the first 2 (warm-up), peak RSS = the process's VmHWM, wall =
the whole command (imports, set-up, training). Rounds are interleaved (a load spike on the shared machine hits every
configuration alike); the table gives median and range over rounds, and the time ratios against the first
configuration per round (median and worst round), measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {  # name -> mixdpo overrides (None: TRL)
    "TRL DPOTrainer": None,
    "mixdpo K=1, trunk trainable": {"experts.num_experts": 1, "experts.trunk": "trainable"},
    "mixdpo K=1, trunk frozen": {"experts.num_experts": 1, "experts.trunk": "frozen"},
    "mixdpo K=3, trunk frozen": {"experts.num_experts": 3, "experts.trunk": "frozen"},
    # the trainer's paths for K experts at the price of one (docs/math.md §16): loss.fused auto is the default above
    "mixdpo K=1, trunk frozen, unfused": {"experts.num_experts": 1, "experts.trunk": "frozen", "loss.fused": "never"},
    "mixdpo K=3, trunk frozen, unfused": {"experts.num_experts": 3, "experts.trunk": "frozen", "loss.fused": "never"},
    "mixdpo K=3, trunk frozen, naive": {"experts.num_experts": 3, "experts.trunk": "frozen",
                                        "experts.logprob_impl": "naive"},
    "mixdpo K=3 r=16, trunk frozen": {"experts.num_experts": 3, "experts.trunk": "frozen", "experts.head_rank": 16},
    "mixdpo K=3 r=64, trunk frozen": {"experts.num_experts": 3, "experts.trunk": "frozen", "experts.head_rank": 64},
    "mixdpo K=3 r=16, trunk frozen, unfused": {"experts.num_experts": 3, "experts.trunk": "frozen",
                                               "experts.head_rank": 16, "loss.fused": "never"},
}
PAIRS, MAX_LENGTH = 8, 128


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def prepare(root: str, vocab: int, num_pairs: int) -> tuple[str, str]:
    """Model directory and data file under root: words of random letters, prompt / responses ~60 tokens each."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixdpo_ds.apps.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(os.path.join(root, "tok"))
    rng = random.Random(0)

    def text(n_tokens: int) -> str:
        words = []
        while len(tok(" ".join(words))["input_ids"]) < n_tokens:
            words.append("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))))
        return " ".join(words[:-1])

    rows = [{"prompt": text(60), "chosen": " " + text(60), "rejected": " " + text(60)} for _ in range(num_pairs)]
    data = os.path.join(root, "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    model_dir = os.path.join(root, "model")
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=MAX_LENGTH, vocab_size=vocab,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, data


def run_trl(model_dir: str, data: str, steps: int, out: str) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = DPOConfig(output_dir=out, per_device_train_batch_size=PAIRS, max_steps=steps, max_length=MAX_LENGTH,
                     learning_rate=1e-4, beta=0.1, use_cpu=True, save_strategy="no", report_to="none",
                     logging_steps=1000, dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()])
    trainer.train()
    return times


def run_mixdpo(model_dir: str, data: str, steps: int, out: str, overrides: dict) -> list[float]:
    from mixdpo_ds.training.callbacks import TrainerCallback
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, trainer):
            self.t0 = time.perf_counter()

        def on_step_end(self, trainer, step, record):
            now = time.perf_counter()
            times.append(now - self.t0)
            self.t0 = now

    over = {"model.name_or_path": model_dir, "data.path": data, "data.group_column": "null", "data.eval_fraction": 0,
            "data.max_length": MAX_LENGTH, "data.max_prompt_length": 64, "train.output_dir": out,
            "train.max_steps": steps,
            "train.micro_batch_size": PAIRS, "train.lr": 1e-4, "train.log_every": 1000, "train.save_every": 0,
            "train.export": False, "train.plots": False, "experts.init_noise": 0.0, **overrides}
    cfg = load_config(os.path.join(HERE, "..", "configs", "tiny.yaml"), [f"{k}={v}" for k, v in over.items()])
    trainer = MixDPOTrainer(cfg, callbacks=[Clock()])
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    return times


def worker(name: str, model_dir: str, data: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as out:
        cfg = CONFIGS[name]
        times = run_trl(model_dir, data, steps, out) if cfg is None else run_mixdpo(model_dir, data, steps, out, cfg)
    return {"name": name, "step_s": statistics.median(times[2:]), "steps_timed": len(times[2:]),
            "peak_rss_mib": _peak_rss_mib()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first 2 are warm-up)")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--append", default=None)
    p.add_argument("--worker", nargs=3, metavar=("NAME", "MODEL", "DATA"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker, a.steps)))
        return 0
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {n: [] for n in a.configs}
    with tempfile.TemporaryDirectory(prefix="mixdpo_vs_trl_") as root:
        model_dir, data = prepare(root, a.vocab, PAIRS * a.steps)
        for _ in range(a.rounds):
            for name in a.configs:
                t0 = time.perf_counter()
                cmd = [sys.executable, __file__, "--worker", name, model_dir, data, "--steps", str(a.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{name}: {proc.stderr[-3000:]}")
                row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}
                print(json.dumps(row), flush=True)
                results[name].append(row)
    tokens = PAIRS * 2 * MAX_LENGTH  # ≤ this many tokens per step (rows of ≤ 128 tokens), the same for all
    first = results[a.configs[0]]
    base_m = statistics.median(r["peak_rss_mib"] for r in first)
    lines = [f"| config | s / step (median, range) | tokens/s | × {a.configs[0]} tokens/s (median, worst round) | "
             f"× its step time (median, worst round) | peak RSS MiB (median, range) | × memory | wall s / command |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        t, m, w = ([r[k] for r in rows] for k in ("step_s", "peak_rss_mib", "wall_s"))
        med = statistics.median(t)
        per_round = [r["step_s"] / b["step_s"] for r, b in zip(rows, first, strict=True)]  # per round
        lines.append(f"| {name} | {med:.2f} ({min(t):.2f}-{max(t):.2f}) | {tokens / med:.0f} | "
                     f"{1 / statistics.median(per_round):.2f} ({1 / max(per_round):.2f}) | "
                     f"{statistics.median(per_round):.2f} ({max(per_round):.2f}) | "
                     f"{statistics.median(m):.0f} ({min(m):.0f}-{max(m):.0f}) | {statistics.median(m) / base_m:.2f} | "
                     f"{statistics.median(w):.0f} |")
    sys.path.insert(0, HERE)
    from bench_expert_logprobs import _commit, _machine

    cmd = shlex.join(["python", "benchmarks/bench_vs_trl.py", *(sys.argv[1:] if argv is None else argv)])
    now = datetime.datetime.now(datetime.timezone.utc)
    text = "\n".join([
        f"### {'mixdpo-ds vs TRL DPOTrainer' if 'TRL DPOTrainer' in a.configs else 'mixdpo-ds trainer paths'} — "
        f"{now:%Y-%m-%d %H:%M} UTC", "",
        f"- machine: {_machine('cpu')}", f"- commit: {_commit()}", f"- command: `{cmd}`",
        f"- GPT-2 4 × 256 (random init), V = {a.vocab}, {PAIRS} pairs/step, rows ≤ {MAX_LENGTH} tokens, fp32, one "
        f"process, 2 torch threads; {a.steps} steps per run (2 warm-up), {a.rounds} interleaved rounds; tokens/s "
        f"counts {tokens} tokens a step; whole benchmark {time.perf_counter() - t_start:.0f} s; load average at the "
        f"end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "", *lines])
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
