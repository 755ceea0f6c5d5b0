"""What a run reports: the console, ``metrics.jsonl``, ``result.json``, TensorBoard and ``timing/``.

Every rank sums up its own actions as they happen (``EpochRecord``: where it waited, how stale its
gradients were, how big its stash grew) and writes them at the end of an epoch into TensorBoard
(``tb/module{k}``) and ``timing/``, with its memory; only the reporting rank (the last module of replica
0, which sees the losses) writes the epoch lines, ``metrics.jsonl`` (with every rank's memory),
``result.json``, the HParams summary, the progress (a bar on a terminal, plain lines elsewhere, with
every rank's memory) and the end-of-run summary.  Between actions only the progress counter and the
record's sums run: device tensors are read once per epoch.

Must not change training or decide anything: it records what the engine hands it; the run-level files are the
reporting rank's alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

import torch

from fdg_dist.config import Config, staleness_options
from fdg_dist.engine import loss
from fdg_dist.engine.executor import EpochResult, Event
from fdg_dist.engine.schedule import Kind
from fdg_dist.engine.staleness import TAGS as STALENESS_TAGS
from fdg_dist.engine.staleness import Probe
from fdg_dist.observe import throughput
from fdg_dist.observe.memory import Usage, describe
from fdg_dist.util.files import atomic_write

log = logging.getLogger("fdg_dist")

Hook = Callable[[Event], None]


def append_line(path: Path, line: str) -> None:
    """Add one line to a JSON-lines record by rewriting it atomically: a crash or a full disk mid-write
    leaves the previous content, never a torn last line (one line per epoch: cheap to copy)."""
    before = path.read_bytes() if path.exists() else b""
    atomic_write(before + line.encode() + b"\n", path)


def rank_name(module: int, replica: int) -> str:
    """``module{k}`` (``-replica{r}`` for r > 0): the name of a rank's TensorBoard run and timing file."""
    return f"module{module}" + (f"-replica{replica}" if replica else "")


def progress_style(mode: str, stream: TextIO = sys.stderr) -> str:
    """``logging.progress`` → ``bar``, ``lines`` or ``none``: ``auto`` draws a bar on a terminal and elsewhere
    (nohup, SLURM, CI) prints a plain line every ``logging.progress_every_s``, which a log file keeps
    readable; ``always`` is the bar anyway, ``lines`` the lines anyway."""
    if mode == "auto":
        return "bar" if stream.isatty() else "lines"
    return {"always": "bar", "lines": "lines"}.get(mode, "none")


def chain(*hooks: Hook | None) -> Hook | None:
    """One ``on_action`` callback out of several optional ones (None if there is none)."""
    live = [h for h in hooks if h is not None]
    if len(live) <= 1:
        return live[0] if live else None

    def run_all(event: Event) -> None:
        for hook in live:
            hook(event)

    return run_all


@dataclass
class Timing:
    """Where one rank's training time went (seconds), and what it did; adds up over epochs."""

    train_s: float = 0.0  # wall time of the training passes
    compute_s: float = 0.0  # forward, backward and step work
    wait_input_s: float = 0.0  # FORWARD blocked on its input: previous module's activation (module 0: data)
    wait_grad_s: float = 0.0  # blocked on the gradient from the next module (BACKWARD)
    samples: int = 0
    stash_max: int = 0

    @property
    def other_s(self) -> float:
        """Communication and bookkeeping: posting sends/receives, draining, the Python around it."""
        return max(self.train_s - self.compute_s - self.wait_input_s - self.wait_grad_s, 0.0)

    def add(self, e: Event) -> None:
        """Count one action, its times resolved."""
        self.compute_s += e.compute_s
        if e.action.kind is Kind.FORWARD:
            self.wait_input_s += e.wait_s
        elif e.action.kind is Kind.BACKWARD:
            self.wait_grad_s += e.wait_s
        self.stash_max = max(self.stash_max, e.stash)

    def __iadd__(self, other: Timing) -> Timing:
        self.train_s += other.train_s
        self.compute_s += other.compute_s
        self.wait_input_s += other.wait_input_s
        self.wait_grad_s += other.wait_grad_s
        self.samples += other.samples
        self.stash_max = max(self.stash_max, other.stash_max)
        return self

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "other_s": self.other_s,
                "samples_per_s": self.samples / self.train_s if self.train_s > 0 else 0.0}


_STEP_VALUES = ("grad_norm", "update_ratio", *STALENESS_TAGS[1:])  # the device values of a step


class EpochRecord:
    """One rank's training pass, summed up action by action as the executor hands over each action with its
    times (``Executor.run``'s ``on_timed``): what ``RunLog.epoch`` reports, in a size fixed at the start, so
    nothing grows with the length of the epoch (an epoch-long list of events kept every action's gradient
    norm, clock marks and staleness probe alive until the epoch's end).

    Staleness is the tick of a STEP minus the tick of the forward of each batch it applies, per gradient;
    each step's device values (``_STEP_VALUES``) go into a buffer of ``steps`` rows made at the start and are
    read in one host transfer at the end, with host flags saying which were measured.
    """

    def __init__(self, steps: int, device: torch.device) -> None:
        self.timing = Timing()
        self.steps = 0  # steps recorded
        self.values = torch.zeros((steps, len(_STEP_VALUES)), device=device)
        self.ratio_at = torch.zeros(steps, dtype=torch.bool)  # host: the update ratio was measured
        self.delays = torch.full((steps,), -1, dtype=torch.int64)  # host: a staleness probe's delay, -1: none
        self.stale_ticks = 0  # summed over the applied gradients
        self.applied = 0
        self._forward_tick: dict[int, int] = {}  # forwarded batches whose gradient is not applied yet

    def add(self, e: Event) -> None:
        """Count one action, its times resolved (an ``on_timed`` callback)."""
        self.timing.add(e)
        a = e.action
        if a.kind is Kind.FORWARD:
            self._forward_tick[a.batch] = a.tick
        for b in e.batches:
            if b in self._forward_tick:  # a resumed epoch applies gradients of forwards from before the cut
                self.stale_ticks += a.tick - self._forward_tick.pop(b)
                self.applied += 1
        if e.step is not None:
            self._put_step(e.step.grad_norm, e.step.update_ratio, e.step.staleness)

    def _put_step(self, norm: torch.Tensor, ratio: torch.Tensor | None, probe: Probe | None) -> None:
        row = self.values[self.steps]
        row[0].copy_(norm)
        if ratio is not None:
            row[1].copy_(ratio)
            self.ratio_at[self.steps] = True
        if probe is not None:
            self.delays[self.steps] = probe.delay_steps
            for i, tag in enumerate(STALENESS_TAGS[1:], start=2):
                value = getattr(probe, tag)
                row[i].copy_(value) if isinstance(value, torch.Tensor) else row[i].fill_(value)
        self.steps += 1

    @property
    def staleness_ticks(self) -> float:
        """Mean ticks from a batch's forward to the step applying its gradient (0 if none was applied)."""
        return self.stale_ticks / self.applied if self.applied else 0.0

    def step_values(self) -> dict[str, dict[int, float]]:
        """Per tag (``module/grad_norm``, ``module/update_ratio``, ``staleness/<tag>``), the value at each step
        index of this pass where it was measured: one host transfer for the epoch."""
        rows = self.values[:self.steps].tolist()
        ratio_at = self.ratio_at[:self.steps].tolist()
        delays = self.delays[:self.steps].tolist()
        out: dict[str, dict[int, float]] = {"module/grad_norm": {i: row[0] for i, row in enumerate(rows)},
                                            "module/update_ratio": {i: rows[i][1] for i, at in enumerate(ratio_at) if at}}
        probed = [i for i, d in enumerate(delays) if d >= 0]
        out["staleness/delay_steps"] = {i: float(delays[i]) for i in probed}
        for j, tag in enumerate(STALENESS_TAGS[1:], start=2):
            out[f"staleness/{tag}"] = {i: rows[i][j] for i in probed}
        return {tag: points for tag, points in out.items() if points}


class ProgressLines:
    """``on_action`` callback: one plain log line at most every ``every_s`` seconds during an epoch (not
    after its last batch: the epoch line follows), with every rank's memory when ``memory`` knows it."""

    def __init__(self, epoch: int, epochs: int, n_batches: int, every_s: float,
                 memory: Callable[[], dict[str, Usage] | None] | None = None) -> None:
        self.epoch, self.epochs, self.n_batches, self.every_s = epoch, epochs, n_batches, every_s
        self.memory = memory
        self.done = 0
        self.start = self.last = time.monotonic()

    def __call__(self, event: Event) -> None:
        if event.action.kind is not Kind.FORWARD:
            return
        self.done += 1
        now = time.monotonic()
        if now - self.last < self.every_s or self.done >= self.n_batches:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        usages = self.memory() if self.memory is not None else None
        log.info("epoch %d/%d  batch %d/%d (%.0f%%)  %.2f batches/s  epoch ends in %s%s", self.epoch + 1, self.epochs,
                 self.done, self.n_batches, 100 * self.done / self.n_batches, rate,
                 duration((self.n_batches - self.done) / rate), f"  {describe(usages)}" if usages else "")


@dataclass
class Stop:
    """How far a run got and why it ended (``result.json`` and the end-of-run summary say it)."""

    epochs: int  # epochs trained, the last one possibly cut short by trainer.max_steps
    steps: int  # training batches, all epochs (what trainer.max_steps counts)
    reason: str


def language_metrics(train: EpochResult, test: EpochResult) -> dict[str, float]:
    """What language models are compared by: bits per character (per token: per byte for byte-level text)
    and the validation perplexity per token; losses are mean nats per token."""
    return {"train_bpc": loss.bits(train.loss), "test_bpc": loss.bits(test.loss),
            "test_perplexity": math.exp(min(test.loss, 700.0))}  # exp overflows a float beyond ~709


def token_unit(tokens: str) -> str:
    """What one token of ``data.tokens`` is, for the console: ``char``, ``byte``."""
    return {"byte": "byte", "char": "char"}.get(tokens, "token")


class RunLog:
    def __init__(self, cfg: Config, run_dir: Path, *, module: int, replica: int, reporter: bool,
                 device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.module = module
        self.replica = replica
        self.reporter = reporter
        self.device = device or torch.device("cpu")
        self.metrics_path = run_dir / "metrics.jsonl"
        self.timing_path = run_dir / "timing" / f"{rank_name(module, replica)}.json"
        self.last: dict | None = None
        self.totals = Timing()
        self.tb_dir = run_dir / "tb" / rank_name(module, replica) if cfg.logging.tensorboard else None
        self.writer = None  # opened at the first write, once the trainer knows where it (re)starts
        self.first_step = 1  # x of this attempt's first optimizer step; a resume moves it
        self.bar = None
        self.progress_style = progress_style(cfg.logging.progress) if reporter else "none"
        text = reporter and cfg.data.name == "text"
        self.flops_token = throughput.flops_per_token(cfg) if text else 0.0
        self.peak_flops = throughput.peak_flops(cfg, self.device) if text else None

    def tensorboard(self):  # -> SummaryWriter; TensorBoard is imported only when used
        """This rank's writer, opened with ``purge_step`` at this attempt's first step: TensorBoard then
        hides what a crashed attempt logged past the checkpoint this one resumed from, so a redone epoch
        is not shown twice."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # a big queue and no timed flush: add_scalar only enqueues; epoch() flushes
            self.writer = SummaryWriter(str(self.tb_dir), max_queue=10_000, flush_secs=10**6,
                                        purge_step=self.first_step)
        return self.writer

    def best_error(self) -> float:
        """Best test error so far (from metrics.jsonl, so a resumed run remembers it)."""
        best = math.inf
        if self.reporter and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                best = min(best, json.loads(line)["test_error"])
        return best

    def progress(self, epoch: int, n_batches: int,
                 memory: Callable[[], dict[str, Usage] | None] | None = None) -> Hook | None:
        """``on_action`` callback showing this epoch's progress on the reporting rank only: a bar (batches/s,
        ETA) or plain lines (``progress_style``) that also show every rank's memory as ``memory`` knows it.

        The executor's events carry no per-batch loss, so the bar shows the previous epoch's train loss.
        """
        epochs = self.cfg.trainer.epochs
        if self.progress_style == "lines":
            return ProgressLines(epoch, epochs, n_batches, self.cfg.logging.progress_every_s, memory)
        if self.progress_style != "bar":
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                        dynamic_ncols=True, file=sys.stderr)
        if self.last is not None:
            self.bar.set_postfix(prev_loss=f"{self.last['train_loss']:.4f}", refresh=False)
        bar = self.bar

        def advance(event: Event) -> None:
            if event.action.kind is Kind.FORWARD:
                bar.update()

        return advance

    def epoch(self, epoch: int, *, lr: float, train: EpochResult, test: EpochResult, seconds: float,
              samples: int, record: EpochRecord, steps: int, memory: dict[str, Usage] | None = None) -> None:
        """Log one epoch; ``steps`` is this module's optimizer step count at its end: TensorBoard's x-axis for
        every tag (per-step tags at their step, per-epoch tags at the epoch's last step), one axis that a
        resume can purge past.  ``memory``: every rank's at the epoch's end (the reporting rank's
        ``metrics.jsonl`` holds it); TensorBoard gets this rank's own."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        timing = replace(record.timing, train_s=seconds, samples=samples)
        self.totals += timing
        self.timing_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write((json.dumps({"module": self.module, "replica": self.replica, **self.totals.to_dict()},
                                 indent=2) + "\n").encode(), self.timing_path)
        # a language model's numbers, once for every record (reading the BPE tokenizer's file included)
        language = self._language(train, test) if self.reporter else {}
        rates = throughput.rates(samples * self.cfg.data.context, seconds, self.flops_token,
                                 self.peak_flops) if language else {}
        if self.tb_dir is not None:
            self._tensorboard(lr, train, test, timing, record, steps, language, rates)
        if not self.reporter:
            return
        row = {"epoch": epoch, "lr": lr, "train_loss": train.loss, "train_error": train.error,
               "test_loss": test.loss, "test_error": test.error, "epoch_time_s": seconds,
               "samples_per_s": samples / seconds if seconds > 0 else 0.0}
        row.update(language)
        row.update(rates)
        if memory is not None:
            row["memory"] = {name: usage.to_dict() for name, usage in memory.items()}
        append_line(self.metrics_path, json.dumps(row))
        self.last = row
        log.info("epoch %3d/%d  lr %.4g  train loss %.4f err %.2f%%  test loss %.4f err %.2f%%  %.1fs  %.0f samples/s",
                 epoch + 1, self.cfg.trainer.epochs, lr, train.loss, 100 * train.error, test.loss, 100 * test.error, seconds,
                 row["samples_per_s"])
        if language:
            unit = token_unit(self.cfg.data.tokens)
            mfu = f"  MFU {100 * rates['mfu']:.2f} %" if "mfu" in rates else ""
            log.info("epoch %3d/%d  bits/%s train %.3f test %.3f  test perplexity %.2f  %.0f tokens/s%s", epoch + 1,
                     self.cfg.trainer.epochs, unit, language["train_bpc"], language["test_bpc"],
                     language["test_perplexity"], rates["tokens_per_s"], mfu)

    def _language(self, train: EpochResult, test: EpochResult) -> dict[str, float]:
        """Bits per character and perplexity for text data (with BPE also bits per byte), nothing otherwise."""
        if self.cfg.data.name != "text":
            return {}
        out = language_metrics(train, test)
        if self.cfg.data.tokens == "bpe":  # module 0 wrote the validation text's bytes per token at the start
            record = json.loads((self.run_dir / "tokenizer.json").read_text())
            out["test_bits_per_byte"] = out["test_bpc"] / record["val_bytes_per_token"]
        return out

    def _tensorboard(self, lr: float, train: EpochResult, test: EpochResult, timing: Timing,
                     record: EpochRecord, steps: int, language: dict[str, float], rates: dict[str, float]) -> None:
        w = self.tensorboard()
        if self.reporter:
            for tag, value in (("train/loss", train.loss), ("train/error", train.error),
                               ("test/loss", test.loss), ("test/error", test.error)):
                w.add_scalar(tag, value, steps)
            for name, value in language.items():  # train_bpc -> train/bpc
                w.add_scalar(name.replace("_", "/", 1), value, steps)
            for name, value in rates.items():
                w.add_scalar(f"perf/{name}", value, steps)
        first = steps - record.steps + 1  # module step number of the epoch's first step
        for tag, points in record.step_values().items():
            for i, value in points.items():
                w.add_scalar(tag, value, first + i)
        summary = timing.to_dict()
        usage = Usage.now(self.device)
        for tag, value in (
                ("module/lr", lr),
                ("module/staleness_ticks", record.staleness_ticks),
                ("module/stash_max", timing.stash_max),
                ("time/compute_s", timing.compute_s),
                ("time/wait_input_s", timing.wait_input_s),
                ("time/wait_grad_s", timing.wait_grad_s),
                ("time/other_s", timing.other_s),
                ("perf/samples_per_s", summary["samples_per_s"]),
                *((f"memory/{name}", value) for name, value in usage.to_dict().items())):
            w.add_scalar(tag, value, steps)
        w.flush()

    def finish(self, *, wall_s: float, best_error: float, steps: int, stop: Stop, bounds: list[int]) -> dict | None:
        """Write ``result.json``, the HParams summary (at the module's final step ``steps``) and the
        end-of-run summary (reporting rank), and close this rank's writer.  ``bounds``: the split the run trained
        (a split changes FDG's arithmetic: a sweep's table shows it beside the errors)."""
        result = self._result(wall_s, best_error, stop, bounds) if self.reporter else None
        if self.tb_dir is not None and result is not None:
            self._hparams(result, steps)
        if self.writer is not None:
            self.writer.close()
        if result is not None:
            log.info("%s", summary(result, self.run_dir))
        return result

    def _result(self, wall_s: float, best_error: float, stop: Stop, bounds: list[int]) -> dict:
        cfg = self.cfg
        result = {
            "final_test_error": self.last["test_error"] if self.last else None,
            "best_test_error": best_error if math.isfinite(best_error) else None,
            "final_test_loss": self.last["test_loss"] if self.last else None,
            **({key: self.last[name] for key, name in (("final_test_bpc", "test_bpc"),
                                                        ("final_test_perplexity", "test_perplexity"),
                                                        ("final_test_bits_per_byte", "test_bits_per_byte"),
                                                        ("tokens_per_s", "tokens_per_s"), ("mfu", "mfu"))
                if name in self.last} if self.last else {}),
            **({"tokens": cfg.data.tokens} if cfg.data.name == "text" else {}),
            "wall_time_s": wall_s,
            "k": cfg.pipeline.k, "replicas": cfg.pipeline.replicas, "beta": cfg.method.beta,
            "method": cfg.method.name, "corrector": cfg.corrector.name, "options": staleness_options(cfg),
            "model": cfg.model.label, "data": cfg.data.name,
            "seed": cfg.trainer.seed, "epochs": stop.epochs, "steps": stop.steps, "stop_reason": stop.reason,
            "epochs_planned": cfg.trainer.epochs, "max_steps": cfg.trainer.max_steps,
            "batch_size": cfg.trainer.batch_size, "split": list(bounds),
        }
        atomic_write((json.dumps(result, indent=2) + "\n").encode(), self.run_dir / "result.json")
        return result

    def _hparams(self, result: dict, steps: int) -> None:
        """One row of TensorBoard's HParams table: a β × K sweep becomes one sortable table."""
        from torch.utils.tensorboard.summary import hparams

        cfg = self.cfg
        params = {"method": cfg.method.name, "corrector": cfg.corrector.name, "beta": cfg.method.beta, "k": cfg.pipeline.k,
                  "replicas": cfg.pipeline.replicas, "model": cfg.model.label, "data": cfg.data.name,
                  "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "batch_size": cfg.trainer.batch_size,
                  "seed": cfg.trainer.seed, "split": str(result["split"])}
        metrics = {f"hparams/{name}": result[name] for name in ("final_test_error", "best_test_error")
                   if result[name] is not None}
        w = self.tensorboard()
        for summary in hparams(params, metrics):
            w.file_writer.add_summary(summary, steps)
        for tag, value in metrics.items():
            w.add_scalar(tag, value, steps)


def _percent(error: float | None) -> str:
    return "–" if error is None else f"{100 * error:.2f} %"


def duration(seconds: float) -> str:
    """``12.3 s`` under a minute, ``1:02:03`` above."""
    return f"{seconds:.1f} s" if seconds < 60 else str(datetime.timedelta(seconds=round(seconds)))


def language_line(result: dict) -> str:
    """The summary's line for a language model: validation bits per character (byte, token), perplexity, speed."""
    unit = token_unit(result.get("tokens", "char"))
    nats = result["final_test_bpc"] * math.log(2)
    speed = f", {result['tokens_per_s']:.0f} tokens/s" if result.get("tokens_per_s") is not None else ""
    if result.get("final_test_bits_per_byte") is not None:
        speed = f", {result['final_test_bits_per_byte']:.3f} bits/byte" + speed
    mfu = f" (MFU {100 * result['mfu']:.2f} %)" if result.get("mfu") is not None else ""
    return (f"  test bits/{unit} final {result['final_test_bpc']:.3f} ({nats:.3f} nats/{unit}), perplexity "
            f"{result['final_test_perplexity']:.2f}{speed}{mfu}")


def summary(result: dict, run_dir: Path) -> str:
    """The end-of-run block: how it ended, the errors, the time, and where everything is."""
    run_dir = run_dir.resolve()
    return "\n".join([
        f"run finished after {result['epochs']} epoch(s), {result['steps']} steps: {result['stop_reason']}",
        f"  test error     final {_percent(result['final_test_error'])}, best {_percent(result['best_test_error'])}",
        *([language_line(result)] if result.get("final_test_bpc") is not None else []),
        f"  training time  {duration(result['wall_time_s'])}",
        f"  run directory  {run_dir}",
        f"  result         {run_dir / 'result.json'}",
        f"  model          {run_dir / 'final_model.pt'} (inference: fdg_dist.load_model('{run_dir}'))",
        f"  report         fdg-report {run_dir}",
    ])
