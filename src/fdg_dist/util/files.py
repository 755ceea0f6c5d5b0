"""Files written whole or not at all, their hashes, and records read back with a one-line error: what
checkpoints, metrics, the run directory, the split choice, the final model and ``fdg-report`` share.

A crash, a kill or a full disk during a write leaves the old content or the new, never half of it; a record
that cannot be read back is named with what to do about it, never met as json's traceback.  Must not import any
other part of fdg_dist, nor know what the files hold.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path) -> str:
    """Write to a temporary file, fsync, rename: a crash leaves the old file or the new one, never half.

    Returns the sha256 of the bytes written, for the manifest.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write(data, path)
    return hashlib.sha256(data).hexdigest()


def atomic_write(data: bytes, path: Path) -> None:
    """Temporary file, fsync, rename, fsync the directory: the old content or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself must reach the disk too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def damaged(where: str | Path, error: Exception, remedy: str) -> str:
    """The one line for a record that cannot be read: ``<where> is damaged (<Type>: <error>); <remedy>``."""
    return f"{where} is damaged ({type(error).__name__}: {error}); {remedy}"


def parse_json(text: str, where: str | Path, remedy: str) -> Any:
    """A JSON record (a file's text, or one line of a JSON-lines file), or a ValueError saying ``damaged``."""
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError
        raise ValueError(damaged(where, e, remedy)) from None


def read_json(path: Path, remedy: str) -> Any:
    """A JSON file's content, or a ValueError naming it (cut short, not UTF-8, not JSON) and ``remedy``."""
    try:
        text = path.read_text()
    except ValueError as e:  # UnicodeDecodeError
        raise ValueError(damaged(path, e, remedy)) from None
    return parse_json(text, path, remedy)
