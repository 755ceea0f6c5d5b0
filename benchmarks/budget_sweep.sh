#!/usr/bin/env bash
# The budget reproduction (docs/budget-reproduction.md): every point of its tables, one run after the other,
# most telling first, each in OUT/<point>/.  A point whose result.json exists is skipped and a stopped run
# resumes from its last epoch checkpoint, so running the script again continues a stopped sweep.
#   benchmarks/budget_sweep.sh DATA_ROOT OUT [extra fdg-train overrides...]
# FDG_TRAIN overrides the command (default: fdg-train).  Then: fdg-report OUT --out OUT/report
set -euo pipefail
root=$1 out=$2
shift 2
train=${FDG_TRAIN:-fdg-train}

point() {  # point NAME OVERRIDES...
    local name=$1
    shift
    [[ -f $out/$name/result.json ]] && return 0
    echo "$(date +%T) $name" >&2
    $train experiment=budget_cifar10_resnet20 data.root="$root" hydra.run.dir="$out/$name" logging.progress=never \
        "$@" "${extra[@]}" > /dev/null
}

extra=("$@")
for seed in 0 1; do  # one seed's whole table before the next seed
    point bp-s$seed pipeline.k=1 trainer.seed=$seed
    for k in 4 3 2; do
        point fdg-k$k-b1-s$seed pipeline.k=$k trainer.seed=$seed
    done
    for k in 4 3; do
        for c in predict lookahead lr_by_delay dc; do
            point fdg-k$k-b1-$c-s$seed pipeline.k=$k corrector=$c trainer.seed=$seed
        done
    done
    for k in 2 3 4; do
        for beta in 0.5 0.2; do
            point fdg-k$k-b$beta-s$seed pipeline.k=$k method.beta=$beta trainer.seed=$seed
        done
    done
    for c in predict lookahead lr_by_delay dc; do
        point fdg-k2-b1-$c-s$seed pipeline.k=2 corrector=$c trainer.seed=$seed
    done
    for k in 2 3 4; do  # the best β with the best corrector (both chosen on seed 0's table)
        point fdg-k$k-b0.2-lr_by_delay-s$seed pipeline.k=$k method.beta=0.2 corrector=lr_by_delay trainer.seed=$seed
    done
done
