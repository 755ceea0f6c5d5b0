#!/usr/bin/env bash
# One node, K GPUs (or K CPU processes): one torchrun worker per pipeline module.
#   launch/local.sh K [hydra overrides...]
#   launch/local.sh 4 model=wrn28_10 data=cifar10 data.root=/data/cifar method.beta=0.5
set -euo pipefail
K=${1:?usage: launch/local.sh K [overrides...]}; shift
# Restarts with torchrun's shared rendezvous store fail often on gloo (pytorch #135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node="$K" --max-restarts="${MAX_RESTARTS:-0}" \
  -m fdg_dist.train pipeline.k="$K" "$@"
