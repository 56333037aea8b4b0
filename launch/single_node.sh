#!/usr/bin/env bash
# One node, N accelerators (GPUs; on a CPU-only host N CPU ranks over gloo), the DeepSpeed launcher.
#
#   bash launch/single_node.sh configs/tiny.yaml [a.b=c ...]
#   NUM_ACCELERATORS=8 bash launch/single_node.sh configs/llama.yaml deepspeed.config=zero3
#
# runs exactly:
#   deepspeed --num_accelerators $NUM_ACCELERATORS --master_port $MASTER_PORT --no_local_rank \
#       --module mixdpo_ds.cli train --config CONFIG [a.b=c ...]
#
# --no_local_rank: every rank reads LOCAL_RANK from the environment (the launcher sets it); the CLI also
# accepts the launcher's `--local_rank=N` when a launch command leaves this flag out.
# Expert parallelism: add experts.ep_size=P (P divides experts.num_experts and the rank count; ZeRO <= 2).
set -euo pipefail
CONFIG=${1:?usage: single_node.sh CONFIG [a.b=c ...]}
shift
NUM_ACCELERATORS=${NUM_ACCELERATORS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --num_accelerators "$NUM_ACCELERATORS" --master_port "$MASTER_PORT" --no_local_rank \
    --module mixdpo_ds.cli train --config "$CONFIG" "$@"
