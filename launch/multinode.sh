#!/usr/bin/env bash
# N nodes, torchrun's c10d rendezvous. Run the same command on every node (NODE_RANK 0 on MASTER's node):
#   IFNAME=ib0 NNODES=2 NODE_RANK=0 MASTER=10.0.0.1:29400 RUN_ID=exp1 launch/multinode.sh GPUS_PER_NODE [overrides...]
# IFNAME: the network interface between the nodes; gloo and NCCL use it (GLOO_SOCKET_IFNAME,
#   NCCL_SOCKET_IFNAME). MASTER: node 0's address on IFNAME and a port PORT.
# Node 0 listens on two fixed ports, both on MASTER's address only: PORT (torchrun's rendezvous) and PORT+1
# (the store the workers build their process groups on). Open both in the firewall between the nodes;
# no other port is needed besides gloo's/NCCL's own connections on IFNAME.
# pipeline.k × pipeline.replicas must equal NNODES × GPUS_PER_NODE. Global rank r·K + k holds module k
# of replica r, so with K = GPUS_PER_NODE each node holds one whole pipeline (P2P stays inside the node).
# The run directory (outputs/torchrun-RUN_ID, or hydra.run.dir=...) must be on a filesystem all nodes share;
# every rank checks it at start. FDG_STORE_SECRET: give every node the same random value (e.g. from
# `openssl rand -hex 32`) and what the stores hold is signed with it (launch/slurm.sbatch does); without it
# the stores have no authentication: use a trusted cluster network.
# RDZV_TIMEOUT (seconds, default 600): how long node 0 waits for every node to join, and the others for node 0
# to answer; a node that never comes, or a port nobody answers, then ends the launch with one line naming it.
set -euo pipefail
GPUS=${1:?usage: launch/multinode.sh GPUS_PER_NODE [overrides...]}; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK (0 on the node MASTER names)}"
: "${MASTER:?set MASTER=host:port, node 0 on IFNAME}" "${IFNAME:?set IFNAME, the network interface between nodes (e.g. eth0, ib0)}"
RUN_ID=${RUN_ID:?set RUN_ID: it names the shared run directory outputs/torchrun-RUN_ID}
export GLOO_SOCKET_IFNAME="$IFNAME" NCCL_SOCKET_IFNAME="$IFNAME"
export FDG_MASTER_ADDR="${MASTER%:*}" FDG_MASTER_PORT=$(( ${MASTER##*:} + 1 )) FDG_NODE_RANK="$NODE_RANK"
exec "${PYTHON:-python}" -m fdg_dist.rendezvous --nnodes="$NNODES" --nproc_per_node="$GPUS" \
  --rdzv-backend=fdg-c10d --rdzv-endpoint="$MASTER" --rdzv-id="$RUN_ID" \
  --rdzv-conf="join_timeout=${RDZV_TIMEOUT:-600},read_timeout=${RDZV_TIMEOUT:-600}" \
  --max-restarts="${MAX_RESTARTS:-0}" -m fdg_dist.train "$@"
