#!/usr/bin/env bash
# One node, K GPUs (or K CPU processes): one torchrun worker per pipeline module.
#   launch/local.sh K [hydra overrides...]
#   launch/local.sh 4 model=wrn28_10 data=cifar10 data.root=/data/cifar method.beta=0.5
# MAX_RESTARTS=N restarts the workers up to N times (they resume from the newest checkpoint); RUN_ID names
# the run directory outputs/torchrun-RUN_ID (default: a new one per call).
# torchrun through fdg_dist.rendezvous: its rendezvous store, like the workers' store, gloo and NCCL,
# listens on 127.0.0.1 only, and what both stores hold is signed with a secret of this run (FDG_STORE_SECRET,
# inherited by torchrun and the workers only): another local process cannot pass its writes off as the run's.
set -euo pipefail
K=${1:?usage: launch/local.sh K [overrides...]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FDG_STORE_SECRET=${FDG_STORE_SECRET:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}
export FDG_STORE_SECRET
RUN_ID=${RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)-$$}
exec "${PYTHON:-python}" -m fdg_dist.rendezvous --nnodes=1 --nproc_per_node="$K" \
  --rdzv-backend=fdg-c10d --rdzv-endpoint=127.0.0.1:0 --rdzv-id="$RUN_ID" --local-addr=127.0.0.1 \
  --max-restarts="${MAX_RESTARTS:-0}" -m fdg_dist.train pipeline.k="$K" "$@"
