"""Low-rank expert heads (`experts.head_rank`) against full heads: step time and memory at a real vocabulary, and
specialisation on the demo's multi-reward task.

    python benchmarks/bench_lowrank_heads.py speed --rounds 3        # V = 50,257, GPT-2 4 × 256, ~5 min on 2 cores
    python benchmarks/bench_lowrank_heads.py specialise --seeds 3    # the demo's multi-reward runs, ~15 min
    add --append benchmarks/RESULTS.md to append the table (machine, commit, date, command).

speed: one policy step on the frozen trunk of a randomly initialised GPT-2 (4 layers × 256, V = 50,257; no hub),
8 pairs × 128 tokens (64 prompt + 64 response tokens per row, N = 1,024 response tokens), fp32: the MixturePolicy
forward (K expert log-probs and the reference from the same trunk pass), the Mix-DPO loss, the backward and an AdamW
step on the trainable parameters. Each configuration runs in its own process (peak RSS = that process's VmHWM, the
whole process: Python, torch, the model and the step), 2 warm-up steps then `--steps` timed ones; rounds are
interleaved (a load spike on the shared machine hits every configuration alike); median and range over rounds of
each round's median step. Ratios are per round, against each K = 1 configuration in the run (full head, separate
or fused loss); "fused": the policy loss from `MixturePolicy.forward(loss=...)` (no logits recompute).

specialise: `benchmarks/bench_ablations.py`'s runner with variants of `experts.head_rank` on the multi-reward task
(the demo's data, SFT base and budgets): DPO (K = 1), K = 3 full heads, K = 3 low-rank heads at a few ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {  # name -> ExpertsConfig overrides (all on the frozen trunk, chunked kernels); "fused": the policy loss
    # from MixturePolicy.forward(loss=FusedLoss(...)), the no-recompute kernels (docs/math.md §16)
    "K=1 full": dict(num_experts=1),
    "K=1 full fused": dict(num_experts=1, fused=True),
    "K=3 full": dict(num_experts=3),
    "K=3 full, naive": dict(num_experts=3, logprob_impl="naive"),
    "K=3 r=16": dict(num_experts=3, head_rank=16),
    "K=3 r=64": dict(num_experts=3, head_rank=64),
    "K=3 r=16 fused": dict(num_experts=3, head_rank=16, fused=True),
    "K=3 r=64 fused": dict(num_experts=3, head_rank=64, fused=True),
}
RANKS = (4, 16)  # the demo's trunk is 64 wide: r / H = 1/16 and 1/4


def _rss_mib(field: str) -> float:
    import re

    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def worker(name: str, steps: int, vocab: int) -> dict:
    """One configuration: build the policy, 2 warm-up steps, `steps` timed steps; -> times and peak RSS."""
    import tempfile

    import torch
    from mixdpo_ds.kernels import mbt_loss
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixdpo_ds.model.experts import ExpertsConfig, build_policy
    from mixdpo_ds.model.lowrank_heads import FusedLoss

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=vocab, n_positions=128)).save_pretrained(
            tmp)
        overrides = {"logprob_impl": "chunked", **CONFIGS[name]}
        fused = overrides.pop("fused", False)
        policy = build_policy(tmp, ExpertsConfig(kind="heads", trunk="frozen", **overrides), seed=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    B, T, P = 8, 128, 64
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (2 * B, T), generator=g)
    labels = input_ids.clone()
    labels[:, :P] = -100
    mask = torch.ones_like(input_ids)
    K = policy.num_experts
    log_w = torch.full((B, K), -torch.log(torch.tensor(float(K))).item())
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        if fused:  # the loss inside the policy forward, its reference from the same pass
            loss = policy(input_ids, mask, labels, loss=FusedLoss(log_w, None, 0.1, {})).policy_loss
        else:
            out = policy(input_ids, mask, labels)
            policy_logps = out.logps.view(2, B, K).transpose(0, 1)                      # (B, 2, K)
            ref = out.ref_logps.view(2, B).T                                            # (B, 2)
            loss = mbt_loss(policy_logps, ref, log_w, 0.1).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in params)
    return {"name": name, "step_s": statistics.median(times), "peak_rss_mib": _rss_mib("VmHWM"),
            "trainable_params": trainable}


def speed(args) -> list[str]:
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {n: [] for n in args.configs}
    loads = []
    for _ in range(args.rounds):
        for name in args.configs:
            cmd = [sys.executable, __file__, "worker", name, "--steps", str(args.steps), "--vocab", str(args.vocab)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if proc.returncode:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            results[name].append(row)
        loads.append(os.getloadavg()[0])
    # ratios within each round (a load spike hits a round's configurations alike), against every K = 1 baseline
    baselines = [n for n in args.configs if n.startswith("K=1")] or args.configs[:1]
    cols = "".join(f" × {b} time (median, worst round) | × {b} memory |" for b in baselines)
    lines = [f"| config | trainable params | s / step (median, range) | peak RSS MiB (median, range) |{cols}",
             "|---|---|---|---|" + "---|---|" * len(baselines)]
    for name, rows in results.items():
        t = [r["step_s"] for r in rows]
        m = [r["peak_rss_mib"] for r in rows]
        cells = ""
        for b in baselines:
            rt = [r["step_s"] / q["step_s"] for r, q in zip(rows, results[b], strict=True)]
            rm = [r["peak_rss_mib"] / q["peak_rss_mib"] for r, q in zip(rows, results[b], strict=True)]
            cells += f" {statistics.median(rt):.2f} ({max(rt):.2f}) | {statistics.median(rm):.2f} |"
        lines.append(f"| {name} | {rows[0]['trainable_params'] / 1e6:.2f}M | {statistics.median(t):.3f} "
                     f"({min(t):.3f}-{max(t):.3f}) | {statistics.median(m):.0f} ({min(m):.0f}-{max(m):.0f}) |{cells}")
    head = (f"GPT-2 4 × 256 (random init), V = {args.vocab}, frozen trunk, 8 pairs × 128 tokens (N = 1,024 response "
            f"tokens), fp32, one process, 2 torch threads; policy forward + Mix-DPO loss + backward + AdamW "
            f"(foreach); {args.steps} timed steps after 2 warm-up per process, {args.rounds} interleaved rounds; "
            f"ratios are per round (config / that round's baseline), median and worst over rounds; whole command "
            f"{time.perf_counter() - t_start:.0f} s. Load average (1 min) after each round: "
            f"{', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} cores.")
    return [head, "", *lines]


def specialise(args) -> list[str]:
    import tempfile

    import torch

    sys.path.insert(0, HERE)
    import bench_ablations as ab

    from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
    from mixdpo_ds.apps.demo import DemoConfig, _quiet

    ab.ABLATIONS["head_rank"] = [("K = 3 full heads", "multi", 3, "mix", {})] + [
        (f"K = 3 low-rank r = {r}", "multi", 3, "mix", {"experts": {"head_rank": r}}) for r in args.ranks]
    _quiet()
    torch.set_num_threads(1)
    cfg = DemoConfig(fast=args.fast, progress_bar=False)
    if args.train_steps:
        cfg.steps = args.train_steps
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixdpo_lowrank_") as root:
        tokenizer = build_review_tokenizer(os.path.join(root, "tok"))
        bases = {s: ab.prepare_seed(cfg, s, root, tokenizer) for s in range(args.seeds)}
        table = ab.run_ablation("head_rank", cfg, args.seeds, root, tokenizer, bases)
    head = (f"The demo's multi-reward task ({args.seeds} seed(s), mean ± sd; frozen SFT trunk of width {cfg.n_embd}, "
            f"{cfg.steps} steps × {cfg.batch_size} pairs, lr {cfg.lr}, β {cfg.beta}, init_noise {cfg.init_noise}); "
            f"total {time.perf_counter() - t0:.0f} s. Load average at the end "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    return [head, "", *table]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--vocab", type=int, default=50257)
    s.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    s.add_argument("--append", default=None)
    c = sub.add_parser("specialise")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    c.add_argument("--train-steps", type=int, default=None, help="steps per run (default: the demo's)")
    c.add_argument("--fast", action="store_true")
    c.add_argument("--append", default=None)
    w = sub.add_parser("worker")
    w.add_argument("name")
    w.add_argument("--steps", type=int, default=3)
    w.add_argument("--vocab", type=int, default=50257)
    a = p.parse_args(argv)
    if a.mode == "worker":
        print(json.dumps(worker(a.name, a.steps, a.vocab)))
        return 0
    lines = speed(a) if a.mode == "speed" else specialise(a)
    sys.path.insert(0, HERE)
    import datetime

    from bench_expert_logprobs import _commit, _machine
    cmd = "python benchmarks/bench_lowrank_heads.py " + " ".join(sys.argv[1:] if argv is None else argv)
    title = "Low-rank expert heads: " + ("step time and memory" if a.mode == "speed" else "specialisation")
    text = "\n".join([f"### {title} — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
                      f"- machine: {_machine('cpu')}", f"- commit: {_commit()}", f"- command: `{cmd}`", "", *lines])
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
