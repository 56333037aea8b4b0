#!/usr/bin/env bash
# CPU smoke run: 2 CPU ranks (gloo) with the DeepSpeed launcher, a tiny GPT-2 built locally, K=3 heads.
# Takes ~1-2 min on 2 cores. Needs no GPU and no network.
#
#   bash launch/cpu_smoke.sh                       # ZeRO-2, dense heads
#   bash launch/cpu_smoke.sh deepspeed.config=zero3
#   bash launch/cpu_smoke.sh experts.num_experts=4 experts.ep_size=2   # expert parallel (ZeRO <= 2)
#
# runs exactly:
#   deepspeed --num_accelerators 2 --master_port $MASTER_PORT --no_local_rank \
#       --module mixdpo_ds.cli train --config configs/tiny.yaml model.name_or_path=$WORK/tiny \
#       train.output_dir=$WORK/run deepspeed.config=zero2 train.micro_batch_size=2 train.max_steps=4 [a.b=c ...]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d /tmp/mixdpo_smoke.XXXXXX)}
MASTER_PORT=${MASTER_PORT:-29561}
export OMP_NUM_THREADS=1
python - "$WORK/tiny" <<'PY'
import sys
from mixdpo_ds.apps.tiny import build_tiny_model, build_tiny_tokenizer
build_tiny_model(sys.argv[1], build_tiny_tokenizer(sys.argv[1]))
PY
deepspeed --num_accelerators 2 --master_port "$MASTER_PORT" --no_local_rank \
    --module mixdpo_ds.cli train --config configs/tiny.yaml model.name_or_path="$WORK/tiny" \
    train.output_dir="$WORK/run" deepspeed.config=zero2 train.micro_batch_size=2 train.max_steps=4 "$@"
echo "cpu_smoke: ok; run directory $WORK/run"
tail -n 2 "$WORK/run/metrics.jsonl"
