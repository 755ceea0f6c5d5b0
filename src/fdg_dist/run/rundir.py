"""One run owns its run directory: an advisory lock for the run's life, and no start that would
overwrite or mix with the records of an earlier run.

Both checks run before anything is written: a refused run leaves the directory as it found it (the
launcher writes ``.hydra/`` only once the run has been accepted).  The lock is ``flock`` on
``.fdg-run.lock``, released by the kernel when its holder exits, however it exits; the file names the
holder so that a refusal can say who.

Must not write anything before both checks pass, nor read what a checkpoint holds (``checkpoint`` chooses and
compares).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fdg_dist.config import Config
from fdg_dist.run import checkpoint

LOCK = ".fdg-run.lock"
log = logging.getLogger("fdg_dist")


class RunDirError(RuntimeError):
    """This run may not start in this directory; the message says why and what to do instead."""


def check_writable(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """``RunDirError`` naming ``key`` unless ``run_dir`` can be written: it, or the folder it would be created
    in, must be writable (a read-only mount or another user's folder fails here, not with a traceback)."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    why = ("is not a directory" if not existing.is_dir() else
           "is on a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "is not writable by you")
    reason = f"it {why}" if existing == run_dir else f"{existing} {why}"
    raise RunDirError(f"{key}: cannot write into {run_dir} ({reason}); give the run a writable directory ({key}=...)")


@contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process until the block ends; ``RunDirError`` naming the holder if busy.

    A filesystem without ``flock`` support (some network mounts) gets a warning, not a refusal.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log.warning("cannot lock %s (%s): nothing stops a second run from using this directory", path, e)
            else:
                raise RunDirError(f"{run_dir} is in use by another run ({_holder(path)}); wait for it to end, "
                                  "or give this run its own directory (hydra.run.dir=...)") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def record_holder(run_dir: Path, overrides: Sequence[str]) -> None:
    """Write who holds the lock (after the run was accepted: a refused run writes nothing)."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds"), "overrides": list(overrides)}
    with open(run_dir / LOCK, "r+") as f:  # in place: a renamed file would not be the locked inode
        f.truncate(0)
        f.write(json.dumps(holder) + "\n")


def _holder(path: Path) -> str:
    """Who holds the lock, as recorded; the record of a run that has ended (the new holder is still
    being checked and has not written its own) is not passed off as the holder."""
    unknown = "a run that is still starting"
    try:
        h = json.loads(path.read_text())
        if h["host"] == socket.gethostname() and not _alive(int(h["pid"])):
            return unknown
        command = " ".join(["fdg-train", *h["overrides"]])
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {command[:200]}"
    except (OSError, ValueError, KeyError, TypeError):
        return unknown


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def records(run_dir: Path, cfg: Config) -> list[str]:
    """What an earlier run left in ``run_dir`` that a fresh start would overwrite or mix with."""
    found = [name for name in ("metrics.jsonl", "result.json", "final_model.pt")
             if (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0]
    root = checkpoint.checkpoint_root(cfg, run_dir)
    found += [f"{cfg.checkpoint.dir}/{d.name}" for d in checkpoint.epoch_dirs(root)[:1]] if root.is_dir() else []
    return found


def check_start(cfg: Config, run_dir: Path, *, recorded: Config | None, restarted: bool) -> None:
    """Refuse a start that would destroy or mix with an earlier run in ``run_dir``.

    ``recorded`` is the configuration the directory's last accepted run wrote (``.hydra/config.yaml``);
    ``restarted`` means this is a later attempt of the same run (torchrun restarting its workers).
    ``resume=never`` never starts over an earlier run's records; ``resume=auto`` with no checkpoint to
    resume starts over only a run of the same configuration (the same command again); a checkpoint of
    another configuration is refused as ``checkpoint.choose`` says.
    """
    if restarted:
        return
    found = records(run_dir, cfg)
    if cfg.resume == "never":
        if found:
            raise RunDirError(f"resume=never: {run_dir} holds an earlier run ({', '.join(found)}); continue it "
                              "with resume=auto, or start this run in another directory (hydra.run.dir=...)")
        return
    try:
        chosen = checkpoint.choose(cfg, run_dir)
    except checkpoint.CheckpointError as e:
        raise RunDirError(str(e)) from None
    if chosen is None and found and recorded is not None:
        before, now = checkpoint.fingerprint(recorded), checkpoint.fingerprint(cfg)
        if before != now:
            changed = ", ".join(sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)))
            raise RunDirError(f"{run_dir} holds an earlier run of another configuration ({changed} differ) and "
                              f"no checkpoint to resume; start this run in another directory (hydra.run.dir=...)")
