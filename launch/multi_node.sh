#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher, two ways. Every node needs the same checkout and environment at the
# same path, and the nodes must reach MASTER_ADDR:MASTER_PORT (node 0 hosts the rendezvous).
#
# 1. From node 0 over passwordless ssh (pdsh), a DeepSpeed hostfile with one line per node ("hostname slots=8"):
#
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh configs/llama.yaml deepspeed.config=zero3
#
# runs exactly:
#   deepspeed --hostfile $HOSTFILE --launcher $LAUNCHER --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
#       --no_local_rank --module mixdpo_ds.cli train --config CONFIG [a.b=c ...]
#
# MASTER_ADDR defaults to the first host of the hostfile. LAUNCHER=pdsh by default (or openmpi, mvapich, slurm);
# see `deepspeed --help`.
#
# 2. Without ssh (NO_SSH=1): start the script on every node yourself (srun, a job scheduler, a terminal per node),
# each with its NODE_RANK; each node's launcher starts that node's ranks only:
#
#   NO_SSH=1 NODE_RANK=r NUM_NODES=2 NUM_ACCELERATORS=8 MASTER_ADDR=node0 \
#       bash launch/multi_node.sh configs/llama.yaml deepspeed.config=zero3          # on node r = 0, 1
#
# runs exactly:
#   deepspeed --hostfile $HOSTFILE --no_ssh --node_rank $NODE_RANK --master_addr $MASTER_ADDR \
#       --master_port $MASTER_PORT --no_local_rank --module mixdpo_ds.cli train --config CONFIG [a.b=c ...]
#
# Without HOSTFILE the script writes one of NUM_NODES lines "node<i> slots=$NUM_ACCELERATORS" to a temporary file
# (removed at exit): with --no_ssh DeepSpeed reads the hostfile only to number the ranks (node r runs global ranks
# r*slots .. r*slots+slots-1), never to reach a host, so the names need not resolve; give a real HOSTFILE when the
# nodes have different slot counts. MASTER_ADDR (the address of node 0) is required; NUM_ACCELERATORS defaults to this
# node's GPU count (1 on a CPU-only host: one gloo rank per node). launch/slurm.sbatch runs this mode, one task per
# node. DRY_RUN=1 (either mode) prints the command instead of running it.
#
# Expert parallelism groups consecutive ranks (experts.ep_size=P ranks per group): keep P <= slots per node so the
# all-to-all stays inside a node.
set -euo pipefail
CONFIG=${1:?usage: [NO_SSH=1 NODE_RANK=r NUM_NODES=n MASTER_ADDR=...] [HOSTFILE=...] multi_node.sh CONFIG [a.b=c ...]}
shift
MASTER_PORT=${MASTER_PORT:-29500}
GENERATED=""
if [ "${NO_SSH:-0}" != 1 ]; then
    HOSTFILE=${HOSTFILE:-launch/hostfile}
    [ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found (lines: 'host slots=N'); NO_SSH=1 needs none" >&2; exit 2; }
    MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
    CMD=(deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" --master_addr "$MASTER_ADDR")
else
    : "${NODE_RANK:?NO_SSH=1 needs NODE_RANK (this node index, 0 .. NUM_NODES-1)}"
    : "${MASTER_ADDR:?NO_SSH=1 needs MASTER_ADDR (the address of node 0, reachable from every node)}"
    if [ -z "${HOSTFILE:-}" ]; then
        : "${NUM_NODES:?NO_SSH=1 without HOSTFILE needs NUM_NODES (the number of nodes)}"
        [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || { echo "NUM_NODES=$NUM_NODES: allowed a whole number >= 1" >&2; exit 2; }
        NUM_ACCELERATORS=${NUM_ACCELERATORS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
        HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/mixdpo_hostfile.XXXXXX")
        GENERATED=$HOSTFILE
        trap 'rm -f "$GENERATED"' EXIT  # hence no exec below; the launcher reads the file once, at its start
        for ((i = 0; i < NUM_NODES; i++)); do echo "node$i slots=$NUM_ACCELERATORS"; done > "$HOSTFILE"
    fi
    [ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found (lines: 'host slots=N')" >&2; exit 2; }
    NODES=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF' | wc -l)
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NODES" ] || {
        echo "NODE_RANK=$NODE_RANK: allowed 0 .. $((NODES - 1)) ($NODES nodes in $HOSTFILE)" >&2; exit 2; }
    CMD=(deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
fi
CMD+=(--master_port "$MASTER_PORT" --no_local_rank --module mixdpo_ds.cli train --config "$CONFIG" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    [ -z "$GENERATED" ] || sed 's/^/# hostfile: /' "$GENERATED"
    printf '%q ' "${CMD[@]}"; echo
elif [ -n "$GENERATED" ]; then
    "${CMD[@]}"
else
    exec "${CMD[@]}"
fi
