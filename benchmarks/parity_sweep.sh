#!/usr/bin/env bash
# Accuracy against back-propagation (issue 33): every point of a points file, one run after the other, each seed
# in OUT/<point>-s<seed>/.  BUDGET is `short` (experiment=budget_cifar10_resnet20: 4,096 images, 160 steps) or
# `long` (experiment=budget_long_cifar10_resnet20: all 45,000 train/ images, val/ as the test set, 1,760 steps).
#   benchmarks/parity_sweep.sh BUDGET DATA_ROOT OUT [POINTS_FILE]     (default benchmarks/parity_points_BUDGET.txt)
# A points file holds one setting a line, `name fdg-train-overrides...` (# starts a comment), most telling first.
# Resumable: a point whose result.json exists is skipped, a stopped run resumes from its last epoch checkpoint;
# the file is read again after every run, so points appended while the sweep runs are taken in order.
# Every run pins pipeline.cost=flops (the split, and so the arithmetic, never depends on a stopwatch) and writes
# OUT/<point>/load.txt: the load average (uptime) at its start and end.  SEEDS (default "0 1") picks the seeds,
# FDG_TRAIN the command (default fdg-train).  Then: fdg-report OUT --out OUT/report
set -euo pipefail
budget=$1 root=$2 out=$3
points=${4:-$(dirname "$0")/parity_points_$budget.txt}
train=${FDG_TRAIN:-fdg-train}
case $budget in
    short) preset=budget_cifar10_resnet20 ;;
    long) preset=budget_long_cifar10_resnet20 ;;
    *) echo "parity_sweep.sh: BUDGET must be short or long, not '$budget'" >&2; exit 2 ;;
esac
declare -A failed=()

next() {  # the first point (name and overrides) of the file not yet done or failed, for any seed
    local name rest seed
    while read -r name rest; do
        [[ -z $name || $name == \#* ]] && continue
        for seed in ${SEEDS:-0 1}; do
            [[ -f $out/$name-s$seed/result.json || -n ${failed[$name-s$seed]:-} ]] && continue
            echo "$name-s$seed trainer.seed=$seed $rest"
            return 0
        done
    done < "$points"
    return 1
}

mkdir -p "$out"
while line=$(next); do
    read -r name overrides <<< "$line"
    echo "$(date +%T) $name: $overrides" >&2
    mkdir -p "$out/$name"
    echo "start $(uptime)" >> "$out/$name/load.txt"
    # shellcheck disable=SC2086  # the overrides are words
    if $train experiment=$preset data.root="$root" hydra.run.dir="$out/$name" logging.progress=never \
            pipeline.cost=flops $overrides > "$out/$name/stdout.log" 2>&1; then
        echo "end $(uptime)" >> "$out/$name/load.txt"
    else
        echo "$(date +%T) $name failed: see $out/$name/stdout.log" >&2
        failed[$name]=1
    fi
done
