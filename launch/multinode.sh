#!/usr/bin/env bash
# N nodes, torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER=host0:29400 RUN_ID=exp1 launch/multinode.sh GPUS_PER_NODE [overrides...]
# pipeline.k × pipeline.replicas must equal NNODES × GPUS_PER_NODE. Global rank r·K + k holds module k
# of replica r, so with K = GPUS_PER_NODE each node holds one whole pipeline (P2P stays inside the node).
# The c10d store has no authentication and listens on MASTER's port on all interfaces: use it on a
# trusted cluster network only.
set -euo pipefail
GPUS=${1:?usage: launch/multinode.sh GPUS_PER_NODE [overrides...]}; shift
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
RUN_ID=${RUN_ID:?set RUN_ID: it names the shared run directory outputs/torchrun-RUN_ID}
exec torchrun --nnodes="${NNODES:?}" --node-rank="${NODE_RANK:?}" --nproc_per_node="$GPUS" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER:?host:port of node 0}" --rdzv-id="$RUN_ID" \
  --max-restarts="${MAX_RESTARTS:-0}" -m fdg_dist.train "$@"
