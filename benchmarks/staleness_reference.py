"""How stale FDG's gradients are against the *full* fresh gradient, per module and corrector (reference simulation).

A pipeline rank can only compare its applied gradient with the local fresh one (the same incoming gradient
through its live weights: the ``staleness/`` tags).  The single-process reference holds every module's current
weights, so it also measures the full fresh gradient of the same batch — what back-propagation would apply now.
This trains the budget recipe (``experiment=budget_cifar10_resnet20``: ResNet-20, a 4,096-image subset, cosine
from lr 0.1, batch 128) for a few epochs in ``reference.Simulation`` with probes and prints, per corrector and
module, the mean local and full cosines and the full norm ratio (applied / fresh, β per hop divided out).

A variant is a corrector name followed by treatments, ``+``-joined: ``predict+spike`` (Kosson et al.'s pair:
weight prediction with spike compensation), ``none+dmom=0.99+nesterov``, ``lr_by_delay+anneal=0.25``,
``none+warmup=16``, ``none+beta=0.2``, ``none+clip=1`` (the tokens ``fdg-report`` prints).

Run: ``python benchmarks/staleness_reference.py --data-root /path/to/cifar10 [--k 4] [--epochs 2]
[--variants none predict predict+spike lr_by_delay dc] [--out staleness_reference.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fdg_dist import data
from fdg_dist.config import Config
from fdg_dist.engine.optim import build_optimizer, build_scheduler
from fdg_dist.engine.reference import Simulation
from fdg_dist.run.trainer import build_module
from fdg_dist.validation import validate

TREATMENTS = {  # variant token -> (config section, key, type of its value; None: a switch set to true)
    "spike": ("optim", "spike_compensation", None), "nesterov": ("optim", "nesterov", None),
    "dmom": ("optim", "delay_momentum_max", float), "clip": ("optim", "clip_norm", float),
    "anneal": ("corrector", "anneal_fraction", float), "warmup": ("method", "sync_warmup_steps", int),
    "beta": ("method", "beta", float),
}


def budget_config(args: argparse.Namespace, variant: str) -> Config:
    """The budget recipe with ``variant``'s corrector and treatments (``predict+spike``, ``none+warmup=16``)."""
    cfg = Config()
    cfg.model.name, cfg.data.name, cfg.data.root = "resnet20", "imagefolder", args.data_root
    cfg.data.train_subset, cfg.trainer.seed = args.train_subset, args.seed
    cfg.sched.name, cfg.trainer.epochs = "cosine", args.schedule_epochs
    corrector, *tokens = variant.split("+")
    cfg.pipeline.k, cfg.method.beta, cfg.corrector.name = args.k, args.beta, corrector
    for token in tokens:
        name, _, value = token.partition("=")
        if name not in TREATMENTS:
            raise SystemExit(f"--variants: unknown treatment {name!r} in {variant!r}; valid: {', '.join(TREATMENTS)}")
        section, key, kind = TREATMENTS[name]
        setattr(getattr(cfg, section), key, True if kind is None else kind(value))
    validate(cfg)
    return cfg


def probe_run(cfg: Config, epochs: int, probe_every: int) -> list[dict]:
    """Train ``epochs`` epochs of ``cfg`` in the reference simulation; its probes."""
    K = cfg.pipeline.k
    modules = [build_module(cfg, K, k).module for k in range(K)]
    optimizers = [build_optimizer(cfg.optim, m.parameters()) for m in modules]
    train_set, _ = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=True, seed=cfg.trainer.seed)
    run_batches = cfg.trainer.epochs * loader.num_batches()
    schedulers = [build_scheduler(cfg.sched, o, cfg.trainer.epochs) for o in optimizers]
    c, o = cfg.corrector, cfg.optim
    sim = Simulation(modules, optimizers, beta=cfg.method.beta, corrector=c.name, dc_lambda=c.dc_lambda,
                     dc_momentum=c.dc_momentum, anneal_steps=c.anneal_steps, probe_every=probe_every,
                     anneal_fraction=c.anneal_fraction, run_batches=run_batches,
                     spike_compensation=o.spike_compensation, delay_momentum_max=o.delay_momentum_max,
                     clip_norm=o.clip_norm, sync_warmup=cfg.method.sync_warmup_steps)
    for epoch in range(epochs):
        sim.epoch(list(loader.epoch(epoch)))
        for s in schedulers:
            s.step()
    return sim.probes


def summarise(probes: list[dict], K: int) -> dict[int, dict[str, float]]:
    """Per module (< K-1), the mean of each probe value."""
    keys = ("delay_steps", "weight_distance", "local_cosine", "full_cosine", "full_norm_ratio")
    return {k: {key: statistics.fmean(p[key] for p in probes if p["module"] == k) for key in keys}
            for k in range(K - 1) if any(p["module"] == k for p in probes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2, help="epochs trained (of the 5-epoch schedule)")
    parser.add_argument("--schedule-epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-every", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["none", "predict", "lookahead", "lr_by_delay", "dc"],
                        help="corrector[+treatment...]: e.g. predict+spike, none+dmom=0.99+nesterov")
    parser.add_argument("--out", type=Path, default=Path("staleness_reference.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    print(f"K={args.k} β={args.beta:g}, {args.epochs} epochs, probes every {args.probe_every} steps; per module: "
          "local cosine / full cosine / full norm ratio (applied / fresh)")
    for variant in args.variants:
        summary = summarise(probe_run(budget_config(args, variant), args.epochs, args.probe_every), args.k)
        results[variant] = summary
        cells = [f"m{k}: {v['local_cosine']:.3f} / {v['full_cosine']:.3f} / {v['full_norm_ratio']:.2f}"
                 for k, v in summary.items()]
        print(f"{variant:24s} " + "   ".join(cells), flush=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "modules": results}, indent=2))


if __name__ == "__main__":
    main()
