#!/usr/bin/env bash
# Kernel checks on one lent GPU (an H100): the Triton kernel tests compiled (no interpreter) and the
# expert_logprobs benchmark at GPT-2 and Llama-3 sizes. Installs nothing; needs a Python with CUDA torch,
# triton, transformers and pytest on PATH (or PYTHON=...). Everything it writes goes under $OUT.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh        # from the repository root; ~4-6 min
#
# Steps (each under its own timeout, total < 9 min): environment → kernel tests (-m kernels, TRITON_INTERPRET=0)
# → benchmark (naive / chunked / triton, fp32 and bf16) → $OUT/RESULTS.md to paste into benchmarks/RESULTS.md.
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

echo "gpu_check status $status (0 = tests passed and benchmarks ran); results in $OUT" | tee -a "$OUT/env.txt"
exit $status
