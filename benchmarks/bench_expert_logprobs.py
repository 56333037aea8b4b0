"""Benchmark expert_logprobs: naive vs chunked (vs triton on a GPU), forward / backward / total time and peak memory.

Question: does the bounded-memory path cost time? Acceptance: at N=4096, H=768, V=50257, K=3 chunked's
peak memory ≤ 1/8 of naive's and its total time ≤ 1.2× naive's. Liger-Kernel's LigerFusedLinearDPOLoss (a fused
linear + DPO loss, K = 1 by construction) runs as a peer at K = 1 on the same N·H·V.

    python benchmarks/bench_expert_logprobs.py                      # CPU default grid, < ~5 min on 2 cores
    python benchmarks/bench_expert_logprobs.py --acceptance --rounds 2   # the acceptance size (CPU: ~30 min, ~10 GB)
    python benchmarks/bench_expert_logprobs.py --device cuda --sizes 4096,768,50257,3 4096,4096,128256,3
    python benchmarks/bench_expert_logprobs.py --sizes 1024,256,50257,3 --impls loss-naive loss-chunked loss-fused
    add --append benchmarks/RESULTS.md to append the table (machine, commit, date, command).

Peak memory. CPU: each measurement runs in a fresh subprocess; the kernel's peak-RSS high-water mark (VmHWM) is
reset through /proc/self/clear_refs after the inputs exist, and peak = VmHWM − VmRSS at that point, so it counts
everything the forward and backward touch (logits, temporaries, gradients), including allocator slack. CUDA:
torch.cuda.max_memory_allocated() − memory_allocated() at the same point. FLOP floor: 6·N·H·V·K (one logits
matmul and two gradient matmuls), divided by the rate of one large fp32 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import torch

ACCEPTANCE = "4096,768,50257,3"
DEFAULT_SIZES = ["256,768,50257,1", "512,256,32000,3", "1024,128,8192,4"]


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _reset_peak(device: str) -> float:
    """Start a peak-memory window; returns the current usage (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    return _rss_mib("VmRSS")


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib("VmHWM")


def _inputs(N, H, V, K, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_(True)
    heads = (torch.randn(K, V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return hidden, heads, targets


def _run_expert(impl, hidden, heads, targets):
    from mixdpo_ds.kernels import expert_logprobs

    hidden.grad = heads.grad = None
    t0 = _sync(hidden.device.type)
    logps = expert_logprobs(hidden, heads, targets, impl=impl)
    t1 = _sync(hidden.device.type)
    logps.backward(torch.ones_like(logps))
    t2 = _sync(hidden.device.type)
    return t1 - t0, t2 - t1


def _run_liger(hidden, heads, targets, compiled):
    """LigerFusedLinearDPOLoss on the same tokens as B pairs of T = 128 tokens (K = 1; chosen rows first).
    Its forward already computes the gradients (chunk by chunk), its backward only scales them. `compiled`
    wraps its chunk step in torch.compile (on this CPU: ~160 s of compilation in the first run)."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    N, H = hidden.shape
    T = min(128, N // 2)
    loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False, compiled=compiled)
    hidden.grad = heads.grad = None
    t0 = _sync(hidden.device.type)
    loss = loss_fn(heads[0], hidden[: N // T * T].view(-1, T, H), targets[: N // T * T].view(-1, T))
    loss = loss[0] if isinstance(loss, tuple) else loss
    t1 = _sync(hidden.device.type)
    loss.backward()
    t2 = _sync(hidden.device.type)
    return t1 - t0, t2 - t1


def _run_loss(impl, hidden, heads, targets):
    """K-head log-probs + the Mix-DPO policy loss + backward on the same tokens as B pairs of rows of 64 response
    tokens (rows 0..B-1 chosen): "loss-naive" / "loss-chunked" (expert_logprobs, per-row sums, mixdpo_loss),
    "loss-fused" (fused_policy_loss: one pass per chunk of pairs, no recompute)."""
    from mixdpo_ds.kernels import expert_logprobs, fused_policy_loss

    from mixdpo_ds.core.losses import mixdpo_loss

    N, K = hidden.shape[0], heads.shape[0]
    B = max(1, N // 128)
    rows = (torch.arange(N, device=hidden.device) // 64).clamp_max(2 * B - 1)  # (N,) row of each token
    ref = torch.full((B, 2), -64.0 * 10, device=hidden.device)
    log_w = torch.full((B, K), -float(torch.log(torch.tensor(float(K)))), device=hidden.device)
    hidden.grad = heads.grad = None
    t0 = _sync(hidden.device.type)
    if impl == "loss-fused":
        loss = fused_policy_loss(hidden, heads, targets, rows, ref, log_w, 0.1).policy_loss
    else:
        token = expert_logprobs(hidden, heads, targets, impl=impl.removeprefix("loss-"))  # (N, K)
        seq = token.new_zeros(2 * B, K).index_add(0, rows, token).view(2, B, K).transpose(0, 1)
        loss = mixdpo_loss(seq, ref, log_w, 0.1).policy_loss
    t1 = _sync(hidden.device.type)
    loss.backward()
    t2 = _sync(hidden.device.type)
    return t1 - t0, t2 - t1


def measure(size: str, impl: str, dtype: str, device: str, repeats: int) -> dict:
    """One (size, impl): the first run also gives the peak memory; time = min over `repeats` further runs
    (or the first run when repeats = 0)."""
    N, H, V, K = map(int, size.split(","))
    hidden, heads, targets = _inputs(N, H, V, K, getattr(torch, dtype), device)
    if impl.startswith("liger"):
        def run():
            return _run_liger(hidden, heads, targets, compiled=impl == "liger-compiled")
    elif impl.startswith("loss-"):
        def run():
            return _run_loss(impl, hidden, heads, targets)
    else:
        def run():
            return _run_expert(impl, hidden, heads, targets)
    base = _reset_peak(device)
    times = [run()]
    peak = _peak(device) - base
    times += [run() for _ in range(repeats)]
    fwd, bwd = min(times[1:] or times, key=sum)
    return dict(N=N, H=H, V=V, K=K, impl=impl, dtype=dtype, fwd_s=fwd, bwd_s=bwd, total_s=fwd + bwd, peak_mib=peak)


def matmul_gflops(device: str, dtype: str) -> float:
    """Rate of a (2048 × 768) @ (768 × 8192) matmul: the best this machine does on this workload's shapes."""
    a = torch.randn(2048, 768, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(768, 8192, device=device, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(5):
        t0 = _sync(device)
        a @ b
        best = min(best, _sync(device) - t0)
    return 2 * 2048 * 768 * 8192 / best / 1e9


def _measure_isolated(args, size, impl) -> dict:
    """CPU: a fresh process per measurement, so one impl's allocator state cannot inflate the next one's RSS."""
    if args.device == "cuda":
        try:
            return measure(size, impl, args.dtype, args.device, args.repeats)
        except torch.OutOfMemoryError as e:  # naive at the largest sizes: a row that says so, not a crash
            torch.cuda.empty_cache()
            return dict(zip(("N", "H", "V", "K"), map(int, size.split(",")), strict=True), impl=impl,
                        dtype=args.dtype, error=f"OutOfMemoryError: {str(e).splitlines()[0][:150]}")
    cmd = [sys.executable, __file__, "--worker", size, impl, "--dtype", args.dtype, "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(zip(("N", "H", "V", "K"), map(int, size.split(",")), strict=True), impl=impl,
                    dtype=args.dtype,
                    error=(proc.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], gflops: float) -> str:
    head = ("| N | H | V | K | impl | dtype | fwd s | bwd s | total s | peak MiB | time / naive | mem / naive "
            "| FLOP floor |")
    lines = [head, "|" + "---|" * 13]
    # baselines: naive for the kernels, loss-naive for the log-probs + loss rows
    naive = {(r["N"], r["H"], r["V"], r["K"], r["impl"].startswith("loss-")): r for r in rows
             if r["impl"] in ("naive", "loss-naive") and "error" not in r}
    for r in rows:
        key = (r["N"], r["H"], r["V"], r["K"])
        if "error" in r:
            lines.append(f"| {' | '.join(map(str, key))} | {r['impl']} | {r['dtype']} | failed: {r['error']} |"
                         + " |" * 6)
            continue
        base = naive.get((*key, r["impl"].startswith("loss-")))
        floor = 6 * r["N"] * r["H"] * r["V"] * r["K"] / (gflops * 1e9)
        ratio_t = f"{r['total_s'] / base['total_s']:.2f}" if base else "-"
        ratio_m = f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.3f}" if base else "-"
        lines.append(f"| {' | '.join(map(str, key))} | {r['impl']} | {r['dtype']} | {r['fwd_s']:.3f} | "
                     f"{r['bwd_s']:.3f} | {r['total_s']:.3f} | {r['peak_mib']:.0f} | {ratio_t} | {ratio_m} | "
                     f"{floor / r['total_s']:.0%} |")
    return "\n".join(lines)


def _machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = re.search(r"Model name:\s+(.*)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    return (f"{model.group(1).strip() if model else platform.processor()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads (torch {torch.__version__})")


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "no commit") + (" + uncommitted changes" if dirty else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=None, help="N,H,V,K tuples")
    parser.add_argument("--acceptance", action="store_true", help=f"only the acceptance size {ACCEPTANCE}")
    parser.add_argument("--impls", nargs="+", default=None, help="naive chunked triton liger liger-compiled "
                        "loss-naive loss-chunked loss-fused (log-probs + Mix-DPO policy loss; loss-fused: no "
                        "recompute); default: naive chunked [triton on cuda] liger (K = 1 sizes only for liger)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the first (default 1; 0 "
                        "with --acceptance)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole grid, interleaved; keep the "
                        "fastest time and the largest peak memory of each row")
    parser.add_argument("--append", default=None, help="append the table to this markdown file")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (0 if args.acceptance else 1)
    if args.worker:
        print(json.dumps(measure(*args.worker, args.dtype, "cpu", args.repeats)))
        return
    sizes = args.sizes or ([ACCEPTANCE] if args.acceptance else DEFAULT_SIZES)
    impls = args.impls or ["naive", "chunked"] + (["triton"] if args.device == "cuda" else []) + ["liger"]
    gflops = matmul_gflops(args.device, args.dtype)
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):  # interleaved rounds: a load spike on a shared machine hits both impls alike
        for size in sizes:
            for impl in impls:
                if impl.startswith("liger") and not size.endswith(",1"):
                    continue  # LigerFusedLinearDPOLoss has one head
                row = _measure_isolated(args, size, impl)
                print(json.dumps(row), flush=True)
                old = best.get((size, impl))
                if old is None or ("error" in old and "error" not in row):
                    best[(size, impl)] = row
                elif "error" not in row:  # fastest round's time, largest round's peak memory
                    best[(size, impl)] = dict(min(old, row, key=lambda r: r["total_s"]),
                                              peak_mib=max(old["peak_mib"], row["peak_mib"]))
    rows = list(best.values())
    table = _table(rows, gflops)
    header = (f"\n### expert_logprobs — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
              f"- machine: {_machine(args.device)}; measured matmul rate {gflops:.0f} GFLOP/s ({args.dtype})\n"
              f"- commit: {_commit()}\n"
              f"- command: `python {' '.join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])}`\n"
              f"- time: min over {args.repeats} runs after a first one (the first when 0) and over {args.rounds} "
              f"interleaved round(s); peak memory: "
              f"{'CUDA max_memory_allocated' if args.device == 'cuda' else 'VmHWM − VmRSS (peak RSS), own process'}"
              f" of the first run; FLOP floor = 6·N·H·V·K / matmul rate / total time\n\n")
    print(header + table)
    if args.append:
        with open(args.append, "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
