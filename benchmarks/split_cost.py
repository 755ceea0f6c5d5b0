"""How well ``pipeline.cost=counted`` ranks splits, against what measured block times predict.

For every model and K: the split counted work gives (``split.counted``), the one balanced counted FLOPs give
(``pipeline.cost=flops``) and the best the measured block times predict (the candidate the measured trial of
``pipeline.cost=time`` starts from, ``choice.rank_candidates``), each scored by the time per batch that the
*measured* block times predict for it (``pace.split_period``).  A ratio of 1.000 means the counted split is the
measured favourite's equal.  ``--fit`` prints the rates that price counted work (``counted.RATES``) fitted to the
first model's measured blocks.

    nice -n 5 python benchmarks/split_cost.py --fit --models resnet20 resnet56 wrn28_10 --batches 128 128 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fdg_dist import models
from fdg_dist.split import choice, counted, pace, partition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "wrn28_10"])
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 128, 16], help="training batch per model")
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--method", default="fdg")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fit", action="store_true", help="fit the rates to the first model's measured blocks")
    parser.add_argument("--json", help="write the rows and every block's measured seconds here")
    parser.add_argument("--measured", help="score against the block times of an earlier --json instead of measuring")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a rank trains on the CPU (one thread per process)
    rows, measurements = [], {}
    earlier = json.loads(Path(args.measured).read_text())["measured"] if args.measured else {}
    print(f"{'model':<9} {'batch':>5} {'K':>2}  {'counted':<18} {'flops':<18} {'measured best':<18} "
          f"{'counted/best':>12} {'flops/best':>10}")
    for i, (name, batch) in enumerate(zip(args.models, args.batches, strict=True)):
        blocks = models.build_blocks(name, 10)
        shape = (batch, 3, 32, 32)
        if name in earlier:
            measured = [pace.BlockTime(*t) for t in earlier[name]]
        else:
            measured = partition.measured_block_times(blocks, shape, torch.device("cpu"), channels_last=True,
                                                      repeats=args.repeats)
        measurements[name] = [[t.forward, t.backward, t.step, t.copy_out] for t in measured]
        work = counted.block_work(blocks, shape)
        if args.fit and i == 0:
            rates = counted.fit(work, [(t.forward, t.backward) for t in measured])
            print(f"fitted on {name} batch {batch}: {1 / rates.flop_s / 1e9:.1f} GFLOP/s, {1 / rates.byte_s / 1e9:.2f} GB/s")
        starts = partition.weighted_starts(blocks)
        flop_costs = partition.block_costs(blocks, (1, 3, 32, 32))
        for K in args.ks:
            best, best_s = choice.rank_candidates(measured, K, args.method, False, starts)[0]
            mine = counted.bounds(blocks, shape, K, args.method, recompute=False, device_type="cpu")
            flops = partition.split_points(flop_costs, K, "auto", starts)
            mine_s, flops_s = (pace.split_period(args.method, measured, b) for b in (mine, flops))
            rows.append({"model": name, "batch": batch, "K": K, "counted": mine, "flops": flops, "best": best,
                         "counted_over_best": mine_s / best_s, "flops_over_best": flops_s / best_s})
            print(f"{name:<9} {batch:>5} {K:>2}  {str(mine[1:-1]):<18} {str(flops[1:-1]):<18} {str(best[1:-1]):<18} "
                  f"{mine_s / best_s:>12.3f} {flops_s / best_s:>10.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "measured": measurements}, indent=1))


if __name__ == "__main__":
    main()
