"""Shared helpers: small configs, multi-process runs through the real launcher, the reference oracle."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

from fdg_dist import data, models
from fdg_dist.cli import launch_local
from fdg_dist.config import Config, DataConfig, ModelConfig, OptimConfig, SchedConfig
from fdg_dist.engine import loss
from fdg_dist.engine.optim import build_optimizer, build_scheduler
from fdg_dist.engine.reference import Simulation
from fdg_dist.run.trainer import build_module, run_batches, seed_everything

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def small_config(**overrides: object) -> Config:
    """tiny model, synthetic data, 6 batches an epoch; dotted keys override (``method.beta=0.5``)."""
    cfg = Config()
    cfg.model.name = "tiny"
    cfg.data.name = "synthetic"
    cfg.data.train_size, cfg.data.test_size = 96, 40
    cfg.trainer.batch_size, cfg.trainer.eval_batch_size = 16, 16
    cfg.trainer.epochs, cfg.trainer.threads = 2, 1
    cfg.optim.lr = 0.05
    cfg.sched.milestones = [1]
    cfg.dist.timeout_s = 60
    cfg.checkpoint.enabled = False
    cfg.logging.tensorboard = False
    cfg.logging.progress = "never"
    cfg.resume = "never"
    # the reference simulation computes in NCHW on a FLOP split; the defaults (auto) would measure both
    cfg.trainer.channels_last, cfg.pipeline.cost = False, "flops"
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def run_pipeline(cfg: Config, run_dir: Path) -> dict | None:
    torch.set_num_threads(1)
    return launch_local(cfg, run_dir)


def reference_state(cfg: Config, start: dict | None = None) -> dict[str, torch.Tensor]:
    """The single-process simulation of the same run: same seed, same batches, same epochs.

    ``start``, an unsplit state (``fdg-checkpoint export``), replaces the built modules' weights, optimizer
    state and LR schedule before the simulation continues from its epoch; it is loaded with torch's own
    ``set_optimizer_state_dict``, not with the code under test.

    With ``pipeline.replicas`` R > 1 every replica is simulated: replica r is fed its shard of each global
    batch (so BatchNorm normalises per shard, as on the ranks), and the R simulations run in lock step on R
    threads that replace each module's gradients by their mean over the replicas before every step (the
    replica group's all-reduce).  Replica 0's state is returned: the others differ only in BatchNorm running
    statistics, which never reach a weight and which evaluation overwrites with replica 0's.
    """
    torch.set_num_threads(1)
    R = cfg.pipeline.replicas
    mean = GradientMean(R) if R > 1 else None
    runs = [_reference_run(cfg, r, mean, start) for r in range(R)]  # built in turn: building reseeds the global RNG
    if R == 1:
        return runs[0]()
    with ThreadPoolExecutor(R) as pool:
        return [f.result() for f in [pool.submit(run) for run in runs]][0]


def _reference_run(cfg: Config, replica: int, mean: GradientMean | None,
                   start: dict | None = None) -> Callable[[], dict[str, torch.Tensor]]:
    """Replica ``replica``'s simulation, built now; calling the result trains it and returns its state."""
    K = cfg.pipeline.k
    built = [build_module(cfg, K, k) for k in range(K)]
    modules, aux = [b.module for b in built], [b.aux_head for b in built]
    optimizers = [build_optimizer(cfg.optim, list(m.parameters()) + (list(a.parameters()) if a else []))
                  for m, a in zip(modules, aux, strict=True)]
    train_set, _ = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=cfg.data.augment,
                          seed=cfg.trainer.seed, shard=(replica, cfg.pipeline.replicas))
    total = run_batches(cfg, loader.num_batches())
    schedulers = [build_scheduler(cfg.sched, o, cfg.trainer.epochs, total) for o in optimizers]
    if start is not None:
        assert not any(aux), "a started reference has no DGL heads to load"
        for m, o, s in zip(modules, optimizers, schedulers, strict=True):
            m.load_state_dict({n: start["model"][n] for n in m.state_dict()})
            set_optimizer_state_dict(m, o, optim_state_dict=copy.deepcopy(start["optimizer"]))
            s.load_state_dict(start["scheduler"])
    sim = Simulation(modules, optimizers, method=cfg.method.name, beta=cfg.method.beta, stash=cfg.method.stash,
                     accum_steps=cfg.method.accum_steps, aux_heads=aux,
                     grad_sync=None if mean is None else functools.partial(mean, replica), schedules=schedulers,
                     corrector=cfg.corrector.name, dc_lambda=cfg.corrector.dc_lambda,
                     dc_momentum=cfg.corrector.dc_momentum, anneal_steps=cfg.corrector.anneal_steps,
                     anneal_fraction=cfg.corrector.anneal_fraction, run_batches=total,
                     spike_compensation=cfg.optim.spike_compensation, delay_momentum_max=cfg.optim.delay_momentum_max,
                     clip_norm=cfg.optim.clip_norm, sync_warmup=cfg.method.sync_warmup_steps)

    def train() -> dict[str, torch.Tensor]:
        steps = 0 if start is None else start["global_step"]
        sim.batches_done = steps
        for epoch in range(0 if start is None else start["next_epoch"], cfg.trainer.epochs):
            budget = loader.num_batches() if cfg.trainer.max_steps is None else min(
                loader.num_batches(), cfg.trainer.max_steps - steps)
            if budget <= 0:
                break
            batches = [b for _, b in zip(range(budget), loader.epoch(epoch))]
            sim.epoch(batches)
            steps += budget
            for s in schedulers:
                s.step()
        state: dict[str, torch.Tensor] = {}
        for m in modules:
            state.update(copy.deepcopy(m.state_dict()))
        return state

    return train


def epoch_batches(cfg: Config) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each epoch's global batches as the run draws them, honouring trainer.max_steps."""
    train_set, _ = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(train_set, cfg.trainer.batch_size, train=True, augment=cfg.data.augment,
                          seed=cfg.trainer.seed)
    steps = 0
    for epoch in range(cfg.trainer.epochs):
        budget = loader.num_batches() if cfg.trainer.max_steps is None else cfg.trainer.max_steps - steps
        batches = [b for _, b in zip(range(budget), loader.epoch(epoch))]
        steps += len(batches)
        yield batches


def data_parallel_reference(cfg: Config, replicas: int) -> dict[str, torch.Tensor]:
    """Single-process training of the unsplit model with DDP's semantics; ``replicas=1`` is plain BP.

    Each global batch is cut into ``replicas`` contiguous shards (``data.shard_bounds``); each shard
    runs forward/backward on the same weights with its own BatchNorm batch statistics, the gradients
    are summed (autograd accumulation, shard 0 first) and divided by R — bitwise the all-reduce mean
    for R = 2 — and one step is taken.  BatchNorm running statistics: every replica keeps its own while
    training and ``Trainer.evaluate`` broadcasts replica 0's before evaluating; the exported model is
    replica 0's, so the reference keeps shard 0's statistics and discards those of the other shards
    (running statistics never influence a training-mode forward, hence no weight).
    """
    torch.set_num_threads(1)
    seed_everything(cfg.trainer.seed)
    model = models.build(cfg.model, cfg.data.num_classes)
    opt = build_optimizer(cfg.optim, model.parameters())
    used = sum(len(y) >= replicas for batches in epoch_batches(cfg) for _, y in batches)
    sched = build_scheduler(cfg.sched, opt, cfg.trainer.epochs, used)
    model.train()
    for batches in epoch_batches(cfg):
        for x, y in batches:
            if len(y) < replicas:
                continue  # the Trainer drops a last batch that would leave a replica without samples
            for r in range(replicas):
                lo, hi = data.shard_bounds(len(y), r, replicas)
                loss.cross_entropy(model(x[lo:hi]), y[lo:hi]).backward()
                if r == 0:
                    replica0 = [b.clone() for b in model.buffers()]
            for b, kept in zip(model.buffers(), replica0, strict=True):
                b.copy_(kept)
            if replicas > 1:
                for p in model.parameters():
                    p.grad /= replicas
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.advance(1)
        sched.step()
    return model.state_dict()


class GradientMean:
    """Lock-step gradient averaging of R replica simulations on R threads.

    Each replica's step of module k waits for every replica's step of module k; then every replica takes
    (g_0 + g_1 + ... + g_{R-1}) / R.  For R = 2 that is bitwise what ``allreduce_mean`` gets from gloo (a
    sum of two does not depend on the order; for R > 2 the all-reduce may add in another order).
    """

    def __init__(self, replicas: int) -> None:
        self.R = replicas
        self.barrier = threading.Barrier(replicas, timeout=120)
        self.posted: dict[int, tuple[int, list[torch.Tensor]]] = {}

    def __call__(self, replica: int, module: int, grads: list[torch.Tensor]) -> None:
        self.posted[replica] = (module, grads)
        self.barrier.wait()  # every replica has posted
        modules = {m for m, _ in self.posted.values()}
        assert modules == {module}, f"replicas step different modules {modules}: their schedules diverged"
        columns = zip(*(self.posted[r][1] for r in range(self.R)), strict=True)
        mean = [functools.reduce(torch.add, column) / self.R for column in columns]
        self.barrier.wait()  # nobody reads the posted gradients any more
        for g, m in zip(grads, mean, strict=True):
            g.copy_(m)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, exact: bool = True) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), f"{name}: max |diff| {(got[name] - want[name]).abs().max()}"
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's exported unsplit model (``final_model.pt``)."""
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def train_spans(run_dir: Path, rank: int, *, waits: bool = False) -> list[dict]:
    """Rank's forward/backward/step spans of training (``logging.trace=true``; with ``waits`` also the spans
    of waiting for their inputs), in execution order."""
    spans = json.loads((run_dir / "trace" / f"rank{rank}.json").read_text())["traceEvents"]
    cats = ("forward", "backward", "step") + (("wait",) if waits else ())
    return [s for s in spans if s.get("cat") in cats and s["args"]["phase"] == "train"]


@dataclass(frozen=True)
class Applied:
    """One gradient a rank applied, as its trace recorded it."""

    epoch: int
    batch: int
    ticks: int  # the step's tick label minus that of the batch's forward
    first_seen_by: int | None  # the first forward (batch) this rank started after the step; None: none followed


def applied_gradients(run_dir: Path, rank: int) -> list[Applied]:
    """Every gradient the rank applied in training, with what the trace's recorded times say about it: which
    forward of the epoch was the first to run on the updated weights (measured, not derived from ticks)."""
    spans = sorted(train_spans(run_dir, rank), key=lambda s: s["ts"])
    out = []
    for step in (s for s in spans if s["cat"] == "step"):
        epoch = step["args"]["epoch"]
        forwards = {f["args"]["batch"]: f for f in spans if f["cat"] == "forward" and f["args"]["epoch"] == epoch}
        later = [b for b, f in forwards.items() if f["ts"] > step["ts"]]
        for b in step["args"]["applied_batches"]:
            out.append(Applied(epoch, b, step["args"]["tick"] - forwards[b]["args"]["tick"], min(later, default=None)))
    return out


def assert_delays_measured(run_dir: Path, rank: int, delay: int, epoch_batches: list[int], *, group: int = 1) -> None:
    """Every update the rank made from batch b (a group of ``group`` batches ending at b) is first used by its
    forward of batch b + ``delay``, or by none when the epoch of ``epoch_batches[e]`` batches has ended first;
    measured from the trace's recorded times, on a timeline ``assert_spans_follow_each_other`` checks."""
    assert_spans_follow_each_other(run_dir, rank)
    applied = applied_gradients(run_dir, rank)
    assert len(applied) == sum(epoch_batches)
    for g in applied:
        last = min(-(-(g.batch + 1) // group) * group, epoch_batches[g.epoch]) - 1  # the group's last batch
        want = last + delay if last + delay < epoch_batches[g.epoch] else None
        assert g.first_seen_by == want, f"rank {rank}, epoch {g.epoch}: batch {g.batch}'s update first seen by {g}"


def assert_staleness_is_the_traces(run_dir: Path, module: int) -> None:
    """TensorBoard's ``module/staleness_ticks`` of every epoch is the mean, over the gradients the module
    applied in it, of the ticks from the batch's forward to its step, as the trace recorded them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb" / f"module{module}"))
    ea.Reload()
    logged = [s.value for s in ea.Scalars("module/staleness_ticks")]
    per_epoch: dict[int, list[int]] = {}
    for g in applied_gradients(run_dir, module):
        per_epoch.setdefault(g.epoch, []).append(g.ticks)
    assert logged == pytest.approx([sum(t) / len(t) for _, t in sorted(per_epoch.items())]), f"module {module}"


def assert_spans_follow_each_other(run_dir: Path, rank: int) -> None:
    """The recorded timeline is a sequence: every span (waits included) starts after the previous one ended,
    and within an epoch the tick labels never go back in time."""
    spans = sorted(train_spans(run_dir, rank, waits=True), key=lambda s: (s["ts"], s["cat"] != "wait"))
    for a, b in zip(spans, spans[1:]):
        assert b["ts"] >= a["ts"] + a["dur"] - 0.01, f"rank {rank}: {b['name']} starts inside {a['name']}"  # µs rounding
        when = [(s["args"]["epoch"], s["args"]["tick"]) for s in (a, b)]
        assert when[1] >= when[0], f"rank {rank}: {b['name']} {when[1]} ran after {a['name']} {when[0]}"


TINY_RUN = ["model=tiny", "data=synthetic", "data.train_size=64", "data.test_size=32", "trainer.batch_size=16",
            "trainer.epochs=1", "checkpoint.enabled=false", "logging.tensorboard=false", "logging.progress=never",
            "dist.timeout_s=60", "trainer.threads=1", "trainer.channels_last=false", "pipeline.cost=flops"]


def run_cli(cwd: Path, *overrides: str, multirun: bool = False, timeout: float = 220) -> subprocess.CompletedProcess:
    """``python -m fdg_dist.train [-m] TINY_RUN OVERRIDES`` (later overrides win) in a subprocess; fails on a
    non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fdg_dist.train", *(["-m"] if multirun else []), *TINY_RUN, *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# ------------------------------------------------------------------------------------------ text, own models
def write_text(path: Path, chars: int = 2400) -> Path:
    """A small deterministic English-like text (40 distinct characters) at ``path``."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "sleeps", "while",
             "king", "queen", "speak", "of", "love", "war", "night", "day"]
    g = torch.Generator().manual_seed(0)
    out, lines = [], 0
    while sum(map(len, out)) < chars:
        line = " ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g).tolist())
        out.append(f"{line}, {lines}.\n")
        lines += 1
    path.write_text("".join(out)[:chars])
    return path


def lm_config(text: Path, **overrides: object) -> Config:
    """A 2-layer GPT (width 16, context 16) on ``text`` at character level: 9 batches of 16 an epoch,
    AdamW with a per-batch warm-up + cosine schedule; dotted keys override as in ``small_config``."""
    cfg = small_config()
    cfg.model = ModelConfig("gpt", args={"context": 16, "layers": 2, "width": 16, "heads": 2})
    cfg.data = DataConfig(name="text", root=str(text), tokens="char", context=16, augment=False,
                          num_classes=len(set(text.read_text())))
    cfg.optim = OptimConfig(name="adamw", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.99))
    cfg.sched = SchedConfig(name="step_cosine", warmup_steps=3, min_lr_ratio=0.1)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def readme_example() -> tuple[str, str]:
    """The documented own-model example (README.md or docs/*.md, wherever its markers are): (the source of
    my_model.py, the fdg-train command), exactly as printed."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = [text for text in (p.read_text() for p in pages) if "<!-- own-model example" in text]
    assert len(found) == 1, f"the own-model example's markers must be on exactly one page, found {len(found)}"
    block = found[0].split("<!-- own-model example")[1].split("<!-- end of own-model example -->")[0]
    return block.split("```python\n")[1].split("```")[0], block.split("```bash\n")[1].split("```")[0].strip()
