"""Checkpoints: per-rank files, a sha256 manifest as the commit marker, and resume.

Layout: ``<run_dir>/<checkpoint.dir>/epoch{E:04d}/module{k}-replica{r}.pt`` plus ``manifest.json``,
E being the 0-based epoch just finished (after the drain, so nothing is in flight), or
``epoch{E:04d}-tick{T:06d}/`` for epoch E cut after tick T by a signal (``preempt``: the stashes and the
messages in flight are in the files).  Files are named by module and replica, never by RANK, which can
change across elastic restarts.  Every rank writes its file atomically; global rank 0 writes the
manifest (sha256 and size of every file) only once all ranks reported success.  A directory without a
manifest, or whose files fail their hash, is not a checkpoint: a flipped byte loads silently with
wrong values, so the hash is checked before loading.

What a rank's file holds is its trainer's ``state_dict()`` (state belongs to its owner); this module
only files, hashes, checks and prunes it.  The trainer hands it that state, a ``Layout`` (where the rank
stands) and the group to gather over; ``restore`` returns what it found (``Found``) and the trainer loads it
itself.  A drained checkpoint of another split, K, number of replicas or
method is re-cut: every rank reads the module files of replica 0, gathers them into one unsplit state and
takes its part (``unsplit``); a directory holding one ``unsplit.pt`` (``fdg-checkpoint import``) is read
directly.  A mid-epoch cut holds its split's stashes and messages in flight: it resumes only as it was.
Every load passes ``weights_only=True``: states are tensors and plain types.  Nothing read from a checkpoint
is ever instantiated: its configuration is only compared.

Must not import the trainer (not even for type hints) nor load state into anything: its owner hands state in
and loads what ``restore`` returns itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fdg_dist.engine.schedule import Kind
from fdg_dist.run import unsplit
from fdg_dist.util.files import atomic_save, atomic_write, damaged, sha256

if TYPE_CHECKING:
    from fdg_dist.config import Config
    from fdg_dist.engine.executor import Event

log = logging.getLogger("fdg_dist")

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the trainer's state_dict (stage state with stash, cut, RNG); 1: before mid-epoch cuts
_EPOCH_DIR = re.compile(r"epoch(\d{4,})(?:-tick(\d{6,}))?")
# What a checkpoint's numbers depend on.  Where and how data is read (root, download, cache) does not
# change them, nor do the epoch count, logging or the launcher settings.  How the split was chosen
# does not matter either: every rank checkpoint records its block bounds, which are compared exactly.
_FINGERPRINT_SECTIONS = ("model", "data", "method", "corrector", "optim", "sched", "pipeline")
_FINGERPRINT_KEYS = ("trainer.batch_size", "trainer.seed", "trainer.precision")
_NEUTRAL_KEYS = ("data.root", "data.download", "data.cache", "pipeline.split", "pipeline.cost")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; the message says which and why."""


@dataclass(frozen=True)
class Layout:
    """Where one rank stands, as its owner tells it: its module and replica of a run of K modules and R
    replicas, cut at ``bounds`` for ``method``, and (for ``save``) the epoch it goes on with and the batches
    done.  ``save`` names the file and writes the manifest from it; ``restore`` compares it with a checkpoint's."""

    module: int
    replica: int
    K: int
    R: int
    bounds: list[int]
    method: str
    next_epoch: int = 0
    global_step: int = 0


@dataclass(frozen=True)
class Found:
    """What ``restore`` found for this rank in ``directory``: its own file's state (``recut`` False: the owner
    loads it with ``load_state_dict``), or the checkpoint's unsplit state, to take its part of (``recut``)."""

    directory: Path
    state: dict[str, Any]
    recut: bool


# ------------------------------------------------------------------------ files
def file_name(module: int, replica: int) -> str:
    return f"module{module}-replica{replica}.pt"


def checkpoint_root(cfg: Config, run_dir: Path) -> Path:
    return run_dir / cfg.checkpoint.dir


def directory_name(epoch: int, tick: int | None = None) -> str:
    """``epoch0003`` after epoch 3, ``epoch0004-tick000017`` for epoch 4 cut after its tick 17."""
    return f"epoch{epoch:04d}" + ("" if tick is None else f"-tick{tick:06d}")


def epoch_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, newest first (complete or not); a cut of epoch E is newer than
    the end of epoch E-1 and older than the end of epoch E."""
    found = [((int(m.group(1)), math.inf if m.group(2) is None else int(m.group(2))), d) for d in root.glob("epoch*")
             if d.is_dir() and (m := _EPOCH_DIR.fullmatch(d.name))]
    return [d for _, d in sorted(found, reverse=True)]


# ----------------------------------------------------------------- fingerprint
def fingerprint(cfg: Config) -> dict[str, Any]:
    """The configuration keys that change a run's numbers, flattened (``pipeline.k``) and JSON-normal."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
    keep = {k: v for k, v in flat.items()
            if (k.split(".")[0] in _FINGERPRINT_SECTIONS or k in _FINGERPRINT_KEYS) and k not in _NEUTRAL_KEYS}
    return json.loads(json.dumps(keep, sort_keys=True))


def config_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _differences(saved: dict[str, Any], current: dict[str, Any], keys: set[str] | None = None) -> str:
    keys = {k for k in set(saved) | set(current) if saved.get(k) != current.get(k)} if keys is None else keys
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in sorted(keys))


def _recuttable(key: str) -> bool:
    """Whether a resume may change this fingerprint key: a drained checkpoint is re-cut for another number of
    modules, of replicas, or another method (the split itself is neutral: it is read from the files)."""
    return key.startswith("method.") or key in ("pipeline.k", "pipeline.replicas")


# ------------------------------------------------------------------------ save
def save(cfg: Config, run_dir: Path, owned: dict[str, Any], layout: Layout, group: dist.ProcessGroup | None,
         epoch: int, tick: int | None = None) -> Path:
    """Write this rank's state ``owned`` (its trainer's ``state_dict()``) at the end of ``epoch`` (or cut after
    ``tick``); global rank 0 commits the manifest once every rank of ``group`` (all of them) succeeded.

    A failed write (disk full, read-only directory) on any rank raises ``CheckpointError`` on every
    rank, naming the rank's error; no manifest is written, so the previous checkpoint stays the newest.
    """
    fp = fingerprint(cfg)
    chash = config_hash(fp)
    root = checkpoint_root(cfg, run_dir)
    directory = root / directory_name(epoch, tick)
    name = file_name(layout.module, layout.replica)
    state = {"format": FORMAT, "config_hash": chash, "epoch": epoch, "tick": tick, **owned}
    try:
        digest = atomic_save(state, directory / name)
        report: tuple[str, str | None, int, str | None] = (name, digest, (directory / name).stat().st_size, None)
    except OSError as e:
        report = (name, None, 0, f"module {layout.module} replica {layout.replica} could not write "
                                 f"{directory / name}: {e}")
    _kill_point(run_dir, layout.module, epoch, "checkpoint")  # file written, manifest not: the riskiest moment
    reports: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
    dist.gather_object(report, reports, dst=0, group=group)
    status: list[str | None] = [None]
    if reports is not None:
        status[0] = _commit(reports, directory, epoch, tick, layout, cfg.checkpoint.keep, fp, chash)
    dist.broadcast_object_list(status, src=0, group=group)
    if status[0] is not None:
        raise CheckpointError(status[0])
    return directory


def _commit(reports: list[Any], directory: Path, epoch: int, tick: int | None, layout: Layout, keep: int,
            fp: dict[str, Any], chash: str) -> str | None:
    """Rank 0: write the manifest if every rank wrote its file, then prune; returns an error or None."""
    previous = next((d.name for d in epoch_dirs(directory.parent) if (d / MANIFEST).exists() and d != directory), None)
    intact = f"; the previous checkpoint ({previous}) is intact" if previous else ""
    failures = [r[3] for r in reports if r[3] is not None]
    if failures:
        return f"checkpoint of epoch {epoch} not written: {'; '.join(failures)}{intact}"
    manifest = {
        "format": FORMAT, "epoch": epoch, "tick": tick, "next_epoch": layout.next_epoch,
        "global_step": layout.global_step, **_run_layout(layout),
        "config_hash": chash, "config": fp,
        "files": {name: {"sha256": digest, "bytes": size} for name, digest, size, _ in reports},
    }
    try:
        atomic_write((json.dumps(manifest, indent=1) + "\n").encode(), directory / MANIFEST)
    except OSError as e:
        return f"checkpoint of epoch {epoch} not committed: cannot write {directory / MANIFEST}: {e}{intact}"
    for leftover in directory.glob(".*.tmp*"):  # of writers killed in an earlier attempt at this epoch
        leftover.unlink(missing_ok=True)
    log.info("checkpoint %s written (%d files)", directory, len(reports))
    try:
        prune(directory.parent, keep)
    except OSError as e:
        log.warning("could not delete old checkpoints under %s: %s", directory.parent, e)
    return None


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and leftovers of crashed writes."""
    dirs = epoch_dirs(root)
    complete = [d for d in dirs if (d / MANIFEST).exists()]
    if not complete:
        return
    oldest_kept = complete[:keep][-1]
    for d in dirs[dirs.index(oldest_kept) + 1:]:
        (d / MANIFEST).unlink(missing_ok=True)  # uncommit first: a half-deleted directory is incomplete
        shutil.rmtree(d)


# --------------------------------------------------------------------- restore
def verify(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a complete checkpoint; (manifest or None, what is wrong) otherwise."""
    path = directory / MANIFEST
    if not path.exists():
        return None, f"{directory} is incomplete: no {MANIFEST} (not every rank finished writing)"
    try:
        manifest = json.loads(path.read_text())
        files = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{path} is corrupt: {type(e).__name__}: {e}"
    for name, (want_bytes, want_sha) in sorted(files.items()):
        f = directory / name
        if not f.exists():
            return manifest, f"{directory}: {name} is missing"
        size = f.stat().st_size
        if size < want_bytes:
            return manifest, f"{f} is truncated: {size} of {want_bytes} bytes"
        if size != want_bytes:
            return manifest, f"{f} has {size} bytes, the manifest says {want_bytes}"
        if sha256(f) != want_sha:
            return manifest, f"{f} is corrupt: its sha256 differs from the manifest's"
    return manifest, None


def _check_config(directory: Path, manifest: dict[str, Any], fp: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model, data, optimizer, schedule, batch, seed or precision, naming the
    keys; another K, number of replicas or method is a re-cut, which a mid-epoch cut cannot take."""
    if manifest.get("config_hash") == config_hash(fp):
        return
    saved = manifest.get("config", {})
    fixed = {k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k) and not _recuttable(k)}
    if fixed:
        raise CheckpointError(f"checkpoint {directory} was written by a different configuration "
                              f"({_differences(saved, fp, fixed)}); a resume may change only pipeline.k, "
                              "pipeline.split, pipeline.replicas and method.*: resume it with that configuration, "
                              "or start this run in another directory (hydra.run.dir=...)")
    _refuse_recutting_a_cut(directory, manifest, _differences(saved, fp))


def _refuse_recutting_a_cut(directory: Path, manifest: dict[str, Any], change: str) -> None:
    """A mid-epoch cut holds stashes and messages in flight that belong to its own split: it resumes only as is."""
    if manifest.get("tick") is None:
        return
    raise CheckpointError(f"checkpoint {directory} was cut mid-epoch (after tick {manifest['tick']} of epoch "
                          f"{manifest['epoch'] + 1}): its stashes and messages in flight belong to its split and "
                          f"cannot be re-cut ({change}); resume it first with the configuration that wrote it; the "
                          "checkpoint of that epoch's end can then be resumed with another split, K or method")


def _newest_complete(root: Path, fp: dict[str, Any] | None, *, upto: int | None = None) -> Path | None:
    """Newest complete checkpoint under ``root``; broken ones are logged and skipped; ``fp``: its configuration
    must fit (``_check_config``); ``upto``: it must resume at that epoch or earlier."""
    for directory in epoch_dirs(root):
        manifest, problem = verify(directory)
        if problem is None:
            if upto is not None and manifest.get("next_epoch", 0) > upto:
                continue
            if fp is not None:
                _check_config(directory, manifest, fp)
            return directory
        log.warning("skipping checkpoint: %s", problem)
    return None


def locate(path: Path, checkpoint_dir: str, fp: dict[str, Any] | None, *, label: str) -> Path:
    """The checkpoint ``path`` names: ``path`` itself if it is one (verified), else the newest complete one in
    it (a checkpoint folder) or in its ``checkpoint_dir`` (a run directory); ``label`` starts every error."""
    if (path / MANIFEST).exists() or _EPOCH_DIR.fullmatch(path.name):
        manifest, problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"{label}: {problem}")
        if fp is not None:
            _check_config(path, manifest, fp)
        return path
    root = path / checkpoint_dir if (path / checkpoint_dir).is_dir() else path
    if not root.is_dir() or not epoch_dirs(root):
        raise CheckpointError(f"{label}: not a checkpoint (an epochNNNN/ directory with {MANIFEST}), "
                              f"a checkpoint directory, or a run directory holding {checkpoint_dir}/")
    found = _newest_complete(root, fp)
    if found is None:
        raise CheckpointError(f"{label}: no complete checkpoint under {root} (see the warnings above)")
    return found


def choose(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint directory to resume from under ``cfg.resume`` (run on one rank), or None."""
    fp = fingerprint(cfg)
    if cfg.resume == "auto":
        # a torn last metrics row: resume before its epoch, so that it is redone and its row written again
        torn = torn_epoch(run_dir / "metrics.jsonl")
        root = checkpoint_root(cfg, run_dir)
        return (None if torn is None else _newest_complete(root, fp, upto=torn)) or _newest_complete(root, fp)
    return locate(Path(cfg.resume), cfg.checkpoint.dir, fp, label=f"resume={cfg.resume}")


def restore(cfg: Config, run_dir: Path, layout: Layout, group: dist.ProcessGroup | None) -> Found | None:
    """What this rank resumes from under ``cfg.resume``: every rank of ``group`` (all of them) reads the same
    checkpoint (chosen on global rank 0), each its own file, or, when the split, K, replicas or method changed,
    the checkpoint's unsplit state; None when there is none (or ``resume=never``).

    The owner loads what it gets, then cuts ``metrics.jsonl`` back (``truncate_metrics``) to the epoch it
    resumes at, so that a resumed run's file equals an uninterrupted run's.
    """
    if cfg.resume == "never":
        return None
    decision: list[Any] = [None, None, False]  # chosen directory, error, whether it is re-cut
    if dist.get_rank() == 0:
        try:
            found = choose(cfg, run_dir)
            decision[0] = None if found is None else str(found)
            decision[2] = found is not None and _needs_recut(found, cfg, layout)
        except CheckpointError as e:
            decision[1] = str(e)
    dist.broadcast_object_list(decision, src=0, group=group)
    if decision[1] is not None:
        raise CheckpointError(decision[1])
    if decision[0] is None:
        return None
    directory = Path(decision[0])
    if decision[2]:
        return Found(directory, read_unsplit(directory), recut=True)
    return Found(directory, _load(cfg, layout, directory), recut=False)


def _read(path: Path) -> dict[str, Any]:
    """One rank's file, of this format."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise CheckpointError(f"{path} cannot be loaded: {type(e).__name__}: {e}") from e
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')!r}; this fdg_dist reads format "
                              f"{FORMAT}: resume it with the version that wrote it, or start afresh with resume=never")
    return state


def _load(cfg: Config, layout: Layout, directory: Path) -> dict[str, Any]:
    """This rank's own file, checked to be its module's, split's and configuration's."""
    path = directory / file_name(layout.module, layout.replica)
    state = _read(path)
    if (state.get("config_hash") != config_hash(fingerprint(cfg)) or state.get("module") != layout.module
            or state.get("bounds") != layout.bounds):  # the manifest said otherwise: an inconsistent checkpoint
        raise CheckpointError(f"{path} belongs to another configuration, split or module than module "
                              f"{layout.module} of this run, unlike its manifest says")
    return state


# ------------------------------------------------------------- another layout
def _describe(manifest: dict[str, Any], directory: Path) -> str:
    """How a checkpoint (or a run: ``_run_layout``) is cut, in words; two layouts are equal when their words are."""
    if manifest.get("layout") == unsplit.FILE:
        return f"unsplit ({manifest['method']})"
    bounds = manifest.get("bounds") or _read(directory / file_name(0, 0))["bounds"]
    method = manifest["method"] if "method" in manifest else manifest["config"].get("method.name")
    return f"{method}, K={manifest['k']}, {manifest['replicas']} replica(s), blocks {bounds}"


def _run_layout(layout: Layout) -> dict[str, Any]:
    """A run's layout as its manifest records it."""
    return {"k": layout.K, "replicas": layout.R, "bounds": layout.bounds, "method": layout.method}


def _needs_recut(directory: Path, cfg: Config, layout: Layout) -> bool:
    """Whether ``directory`` was written by another layout (split, K, replicas, method) than this run's."""
    manifest = json.loads((directory / MANIFEST).read_text())
    mine = _describe(_run_layout(layout), directory)
    theirs = _describe(manifest, directory)
    if theirs == mine and manifest.get("config_hash") == config_hash(fingerprint(cfg)):
        return False
    _refuse_recutting_a_cut(directory, manifest, f"written as {theirs}, this run is {mine}")
    return True


def read_unsplit(directory: Path) -> dict[str, Any]:
    """The unsplit state of a complete, drained checkpoint: its imported file, or gathered from the module
    files of replica 0 (``unsplit.gather``)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    _refuse_recutting_a_cut(directory, manifest, "converting it")
    try:
        if manifest.get("layout") == unsplit.FILE:
            state = read_unsplit_file(directory / unsplit.FILE)
        else:
            states = [_read(directory / file_name(k, 0)) for k in range(manifest["k"])]
            foreign = [k for k, s in enumerate(states) if s.get("config_hash") != manifest["config_hash"]]
            if foreign:
                raise unsplit.UnsplitError(f"{file_name(foreign[0], 0)} belongs to another configuration than its "
                                           "manifest")
            state = unsplit.gather(states, manifest["config"], manifest["replicas"])
    except unsplit.UnsplitError as e:
        raise CheckpointError(f"checkpoint {directory} cannot be re-cut: {e}") from e
    return state


def read_weights(directory: Path) -> dict[str, Any]:
    """The model weights (pipeline keys) of a complete checkpoint, drained or cut mid-epoch, and its manifest's
    configuration fingerprint: what sampling and evaluation need, nothing of the optimizer.  A cut gives each
    module's live weights (the gradients still in flight are not applied)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("layout") == unsplit.FILE:
        return {"model": read_unsplit_file(directory / unsplit.FILE)["model"], "config": manifest["config"]}
    weights: dict[str, Any] = {}
    for k in range(manifest["k"]):
        weights.update(_read(directory / file_name(k, 0))["stage"]["module"])
    return {"model": weights, "config": manifest["config"]}


def read_unsplit_file(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """An unsplit state from ``path`` (or from ``data``, its bytes already read and checked)."""
    try:
        state = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise CheckpointError(f"{path} cannot be loaded: {type(e).__name__}: {e}") from e
    try:
        unsplit.check(state)
    except unsplit.UnsplitError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return state


def log_recut(found: Found, layout: Layout, aux_channels: int) -> None:
    """Say (on global rank 0, once its owner took its part of ``found``) what a re-cut carried over and what not."""
    manifest = json.loads((found.directory / MANIFEST).read_text())
    log.info("re-cut checkpoint %s (%s) as %s: weights, buffers, optimizer state per parameter, LR schedule "
             "and counters carried over", found.directory, _describe(manifest, found.directory),
             _describe(_run_layout(layout), found.directory))
    log.info("not carried over: %s", "; ".join(unsplit.not_carried(found.state, layout.method, layout.bounds,
                                                                   aux_channels)))


def commit_unsplit(data: bytes, state: dict[str, Any], directory: Path) -> None:
    """Write an unsplit state (its file's bytes) as a checkpoint directory: the file, then the manifest."""
    atomic_write(data, directory / unsplit.FILE)
    manifest = {
        "format": FORMAT, "layout": unsplit.FILE, "epoch": state["next_epoch"] - 1, "tick": None,
        "next_epoch": state["next_epoch"], "global_step": state["global_step"], "method": state["source"]["method"],
        "config_hash": config_hash(state["config"]), "config": state["config"],
        "files": {unsplit.FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
    }
    atomic_write((json.dumps(manifest, indent=1) + "\n").encode(), directory / MANIFEST)


def _row_epoch(line: str) -> int | None:
    """The epoch of a metrics row, or None for a line that is not one (cut short, damaged)."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def torn_epoch(path: Path) -> int | None:
    """The epoch whose row is the last line of ``metrics.jsonl`` if that line was cut short while it was
    written (a crash or a full disk under an older version): the one after the last whole row."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not lines or _row_epoch(lines[-1]) is not None:
        return None
    whole = [epoch for epoch in map(_row_epoch, lines[:-1]) if epoch is not None]
    return whole[-1] + 1 if whole else 0


def truncate_metrics(path: Path, start_epoch: int) -> list[dict[str, Any]]:
    """Drop metric lines of epochs ≥ ``start_epoch`` (they will be produced again); returns the rows kept.

    A last line cut short is dropped with a warning saying whether its epoch is redone (``choose`` resumes
    before it if a checkpoint there is kept) or its row stays missing; a damaged line before the last is an
    error naming the file and line.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            rows.append((line, row, int(row["epoch"])))
        except (ValueError, KeyError, TypeError) as e:
            if number < len(lines):
                raise CheckpointError(damaged(f"{path}: line {number}", e, "repair or delete that line (each line "
                                                                              "is one epoch) and resume again")) from e
            torn = rows[-1][2] + 1 if rows else 0  # as torn_epoch says: choose resumed before it if it could
            what = (f"epoch {torn + 1} is redone and its row written again" if start_epoch <= torn
                    else f"no checkpoint before epoch {torn + 1} is kept, so the run goes on after it and this "
                         "file has no row for that epoch")
            log.warning("%s: dropped its last line, cut short while it was written (%r); %s", path, line[:60], what)
    kept = [(line, row) for line, row, epoch in rows if epoch < start_epoch]
    repaired = "".join(line + "\n" for line, _ in kept)
    if repaired != text:
        atomic_write(repaired.encode(), path)
    return [row for _, row in kept]


# ----------------------------------------------------------------- test hooks
def _kill_spec(run_dir: Path, module: int, epoch: int) -> dict[str, str] | None:
    """``FDG_TEST_KILL`` if it targets module ``module`` in epoch ``epoch`` and has not fired in this run dir."""
    spec = os.environ.get("FDG_TEST_KILL")
    if not spec:
        return None
    want = dict(item.split("=") for item in spec.split(","))
    if int(want["module"]) != module or int(want["epoch"]) != epoch or _kill_marker(run_dir, module).exists():
        return None
    return want


def _kill_marker(run_dir: Path, module: int) -> Path:
    return run_dir / f".fdg_test_killed-module{module}"


def _die(run_dir: Path, module: int, want: dict[str, str]) -> None:
    """SIGKILL (or ``signal=STOP``: a hung rank; ``signal=TERM``: a preemption) this process, once."""
    _kill_marker(run_dir, module).touch()
    os.kill(os.getpid(), getattr(signal, f"SIG{want.get('signal', 'KILL')}"))


def kill_hook(run_dir: Path, module: int, epoch: int) -> Callable[[Event], None] | None:
    """Fault injection for the resume tests: ``FDG_TEST_KILL="module=K,epoch=E,batch=B[,signal=STOP]"``.

    The worker of module K SIGKILLs (or SIGSTOPs: a hung rank) itself right after its forward of training
    batch B in epoch E, once per run directory (a marker file records it), so a restarted attempt runs
    through.
    """
    want = _kill_spec(run_dir, module, epoch)
    if want is None or "batch" not in want:
        return None

    def hook(event: Event) -> None:
        if event.action.kind is Kind.FORWARD and event.action.batch == int(want["batch"]):
            _die(run_dir, module, want)

    return hook


def _kill_point(run_dir: Path, module: int, epoch: int, at: str) -> None:
    """``FDG_TEST_KILL="module=K,epoch=E,at=checkpoint"``: module K dies there (once per run directory)."""
    want = _kill_spec(run_dir, module, epoch)
    if want is not None and want.get("at") == at:
        _die(run_dir, module, want)
