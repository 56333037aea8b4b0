#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile (one line per node: "hostname slots=8"), started from node 0
# over passwordless ssh (pdsh). Every node needs the same checkout and environment at the same path.
#
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh configs/llama.yaml deepspeed.config=zero3
#
# runs exactly:
#   deepspeed --hostfile $HOSTFILE --master_addr $MASTER_ADDR --master_port $MASTER_PORT --no_local_rank \
#       --module mixdpo_ds.cli train --config CONFIG [a.b=c ...]
#
# MASTER_ADDR defaults to the first host of the hostfile. Without pdsh: LAUNCHER=openmpi (or mvapich,
# slurm); see `deepspeed --help`. Expert parallelism groups consecutive ranks (experts.ep_size=P ranks
# per group): keep P <= slots per node so the all-to-all stays inside a node.
set -euo pipefail
CONFIG=${1:?usage: HOSTFILE=... multi_node.sh CONFIG [a.b=c ...]}
shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found (lines: 'host slots=N')" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-pdsh}
exec deepspeed --hostfile "$HOSTFILE" --launcher "$LAUNCHER" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --no_local_rank --module mixdpo_ds.cli train --config "$CONFIG" "$@"
