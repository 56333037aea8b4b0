#!/usr/bin/env bash
# Kernel checks on one lent GPU (an H100): the Triton kernel tests compiled (no interpreter) and the
# expert_logprobs benchmark at GPT-2 and Llama-3 sizes. Installs nothing; needs a Python with CUDA torch,
# triton, transformers and pytest on PATH (or PYTHON=...). Everything it writes goes under $OUT.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh        # from the repository root; ~4-6 min
#
# Steps (each under its own timeout, total < 10 min): environment → kernel tests (-m kernels, TRITON_INTERPRET=0)
# → the PyTorch-only paths on CUDA (low-rank heads, the no-recompute fused policy loss) against fp64 CPU references
# → benchmark (naive / chunked / triton, fp32 and bf16; loss-naive / loss-chunked / loss-fused) → $OUT/RESULTS.md
# to paste into benchmarks/RESULTS.md. Low-rank heads have no Triton kernel yet: auto runs their chunked path.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
status=0

# mixdpo_ds.kernels is the repo's kernels/ directory (setup.py package_dir); without an install, import it
# through a symlink tree on PYTHONPATH
if ! "$PY" -c "import mixdpo_ds.kernels" 2>/dev/null; then
    SHIM=$(mktemp -d)
    mkdir "$SHIM/mixdpo_ds"
    ln -s "$PWD"/mixdpo_ds/* "$SHIM/mixdpo_ds/"
    ln -s "$PWD/kernels" "$SHIM/mixdpo_ds/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u
    git rev-parse --short HEAD 2>/dev/null || echo "no git"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device"; exit 2; }

echo "== kernel tests (compiled Triton, -m kernels)" | tee "$OUT/kernel_tests.txt"
TRITON_INTERPRET=0 timeout 240 "$PY" -m pytest -q tests/kernels -m kernels -p no:cacheprovider --durations=10 \
    --junitxml "$OUT/kernel_tests.xml" 2>&1 | tee -a "$OUT/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== low-rank heads and fused policy loss on CUDA vs fp64 CPU" | tee "$OUT/pytorch_paths.txt"
timeout 60 "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/pytorch_paths.txt"
import sys
import torch
from mixdpo_ds.kernels import fused_policy_loss, lowrank_logprobs

g = torch.Generator().manual_seed(0)
N, H, V, K, r = 512, 256, 50257, 3, 16
cpu = {"hidden": torch.randn(N, H, generator=g), "base": torch.randn(V, H, generator=g) / 16,
       "up": torch.randn(K, V, r, generator=g) / 4, "down": torch.randn(K, r, H, generator=g) / 16}
targets = torch.randint(0, V, (N,), generator=g)
grad = torch.randn(N, K + 1, generator=g)
worst = 0.0
def lowrank(device, dtype, impl):
    leaves = {n: t.to(device, dtype, copy=True).requires_grad_() for n, t in cpu.items()}
    lp = lowrank_logprobs(*leaves.values(), targets.to(device), include_base=True, impl=impl)
    lp.backward(grad.to(device, lp.dtype))
    return [lp.detach().double().cpu()] + [t.grad.double().cpu() for t in leaves.values()]
ref = lowrank("cpu", torch.float64, "naive")
for impl in ("naive", "chunked"):
    out = lowrank("cuda", torch.float32, impl)
    for name, a, b in zip(("logps", "d_hidden", "d_base", "d_up", "d_down"), out, ref):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err)
        print(f"lowrank {impl} {name}: max rel err vs fp64 {err:.2e}")
rows = torch.arange(N) // 32  # 16 rows of 32 tokens: 8 pairs
heads = (torch.randn(K, V, H, generator=g) / 16)
ref_lp, log_w = torch.full((8, 2), -300.0), torch.full((8, K), -1.0986)
def fused(device, dtype):
    h, w = (t.to(device, dtype, copy=True).requires_grad_() for t in (cpu["hidden"], heads))
    out = fused_policy_loss(h, w, targets.to(device), rows.to(device), ref_lp.to(device, dtype),
                            log_w.to(device, dtype), 0.1, chunk_tokens=96)
    out.policy_loss.backward()
    return [out.policy_loss.detach().double().cpu(), h.grad.double().cpu(), w.grad.double().cpu()]
for name, a, b in zip(("loss", "d_hidden", "d_heads"), fused("cuda", torch.float32), fused("cpu", torch.float64)):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    worst = max(worst, err)
    print(f"fused_policy_loss {name}: max rel err vs fp64 {err:.2e}")
sys.exit(0 if worst < 1e-3 else 1)  # TF32 is off by default for fp32 matmuls in torch: fp32 rounding only
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark" | tee "$OUT/bench.txt"
# GPT-2 small (H 768, V 50257) and Llama-3 8B (H 4096, V 128256) heads, K = 3, N = 4096 response tokens
timeout 150 "$PY" benchmarks/bench_expert_logprobs.py --device cuda --dtype float32 --repeats 3 \
    --sizes 4096,768,50257,3 4096,4096,128256,3 --impls naive chunked triton --append "$OUT/RESULTS.md" \
    2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 150 "$PY" benchmarks/bench_expert_logprobs.py --device cuda --dtype bfloat16 --repeats 3 \
    --sizes 4096,768,50257,3 4096,4096,128256,3 16384,4096,128256,3 --impls naive chunked triton \
    --append "$OUT/RESULTS.md" 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# the no-recompute fused policy loss against log-probs + loss, naive and chunked (K = 3 full heads)
timeout 60 "$PY" benchmarks/bench_expert_logprobs.py --device cuda --dtype float32 --repeats 3 \
    --sizes 4096,768,50257,3 --impls loss-naive loss-chunked loss-fused --append "$OUT/RESULTS.md" \
    2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check status $status (0 = tests passed and benchmarks ran); results in $OUT" | tee -a "$OUT/env.txt"
exit $status
