"""``fdg-checkpoint``: a run's checkpoint as one unsplit file, for continuing elsewhere, and back.

``export`` writes the state of a drained checkpoint (``unsplit``: the model's ``state_dict``, the optimizer's
state by parameter name, its LR schedule and counters) to one file and, beside it, ``FILE.sha256`` in
``sha256sum``'s format: the commit marker, as a checkpoint's manifest is (``sha256sum -c`` checks it).
``import`` checks that hash, then files the state as a checkpoint directory of a run directory, which
``fdg-train`` resumes with any split, K, number of replicas or method.

An entry point (layer 6): nothing in the package imports it.  Must not redo what ``run.checkpoint`` (verify,
read, commit) and ``run.unsplit`` (gather, cut) do: it only calls them and writes the one file.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from fdg_dist.run import checkpoint, rundir
from fdg_dist.run.checkpoint import CheckpointError
from fdg_dist.util import files

SUFFIX = ".sha256"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


def export(source: Path, out: Path, checkpoint_dir: str = "checkpoints", *,
           overwrite: bool = False) -> tuple[Path, dict]:
    """Write the unsplit state of the checkpoint ``source`` names (a checkpoint, a checkpoint folder or a run
    directory: its newest complete checkpoint) to ``out`` and its hash beside it; returns the checkpoint used
    and the state.  An existing ``out`` is replaced only with ``overwrite``."""
    if not overwrite and out.exists():
        raise CheckpointError(f"{out} exists; export to a new file, or pass --force to replace it")
    directory = checkpoint.locate(source, checkpoint_dir, None, label=str(source))
    state = checkpoint.read_unsplit(directory)
    sidecar(out).unlink(missing_ok=True)  # the old hash must not vouch for a half-written new file
    digest = files.atomic_save(state, out)
    files.atomic_write(f"{digest}  {out.name}\n".encode(), sidecar(out))
    return directory, state


def import_(path: Path, run_dir: Path, checkpoint_dir: str = "checkpoints") -> Path:
    """File the unsplit state ``path`` as ``run_dir/<checkpoint_dir>/epochNNNN/``; returns that directory.

    Refused: a file whose hash is missing or differs, anything but an unsplit state, a run directory that
    already holds checkpoints (they would mix) or that a run is using.
    """
    marker = sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (an unsplit state written by fdg-checkpoint export)")
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {marker.name} beside it (the hash export writes); if the file is "
                              f"complete, write it with: sha256sum {path.name} > {marker.name}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != (marker.read_text().split() or [""])[0]:
        raise CheckpointError(f"{path} is corrupt or was changed: its sha256 differs from {marker.name}'s")
    state = checkpoint.read_unsplit_file(path, data)
    if state["next_epoch"] < 1:
        raise CheckpointError(f"{path}: next_epoch must be ≥ 1 (the state after an epoch)")
    root = run_dir / checkpoint_dir

    def refuse_mixing() -> None:
        if root.is_dir() and checkpoint.epoch_dirs(root):
            raise CheckpointError(f"{root} already holds checkpoints; import into a new run directory")

    refuse_mixing()  # before the lock, which creates the directory: a refusal writes nothing
    with rundir.claim(run_dir):
        refuse_mixing()
        directory = root / checkpoint.directory_name(state["next_epoch"] - 1)
        checkpoint.commit_unsplit(data, state, directory)
    return directory


def _describe(state: dict) -> str:
    s = state["source"]
    return (f"model {state['config'].get('model.name')}, {len(state['model'])} tensors, written by {s['method']} "
            f"K={s['k']} ×{s['replicas']} replica(s), next epoch {state['next_epoch'] + 1}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fdg-checkpoint", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    out = verbs.add_parser("export", help="a run's checkpoint -> one unsplit file (+ FILE.sha256)")
    out.add_argument("source", type=Path, help="a checkpoint (epochNNNN/), a checkpoint folder or a run directory")
    out.add_argument("file", type=Path, help="the unsplit file to write, e.g. state.pt")
    out.add_argument("--force", action="store_true", help="replace FILE if it exists")
    into = verbs.add_parser("import", help="an unsplit file -> a checkpoint that fdg-train resumes with any split")
    into.add_argument("file", type=Path, help="an unsplit file written by export (FILE.sha256 beside it)")
    into.add_argument("run_dir", type=Path, help="the run directory to file it in (new, or without checkpoints)")
    for verb in (out, into):
        verb.add_argument("--checkpoint-dir", default="checkpoints", help="checkpoint.dir of the run (checkpoints)")
    args = parser.parse_args(argv)
    try:
        if args.verb == "export":
            directory, state = export(args.source, args.file, args.checkpoint_dir, overwrite=args.force)
            print(f"exported {directory} ({_describe(state)}) to {args.file} and {sidecar(args.file).name}")
        else:
            directory = import_(args.file, args.run_dir, args.checkpoint_dir)
            print(f"imported {args.file} as {directory}; continue it with any pipeline.k, pipeline.split, "
                  f"pipeline.replicas or method: fdg-train <its configuration> hydra.run.dir={args.run_dir}")
    except (CheckpointError, rundir.RunDirError, OSError) as e:
        print(f"fdg-checkpoint: {e}", file=sys.stderr)
        sys.exit(2)
