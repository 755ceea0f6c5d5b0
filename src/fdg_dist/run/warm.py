"""Processes that start warm: a fork server that has imported torch and the worker once, so the launcher's
configuration check and every worker (first attempt, restarts, every job of a sweep) start in milliseconds
instead of importing torch again.

A spawned worker spends ~4 s on a 2-core CPU importing torch, the launcher and the meta kernels before its
first line; the launcher's check of the model another ~1-2 s.  ``fdg-train`` starts the server before it
imports the launcher (``fdg_dist.train``), so the server's imports run on one core while the launcher's own run
on another.  A forked process inherits the environment the server started with; what the launcher set since
(the run's secret, its failure folder, a sweep's keys) travels with each call (``environment_since``, ``arrive``).

The server ignores SIGTERM.  It reports each worker's exit to the launcher, so it must outlive a SIGTERM sent
to every process of the run at once (SLURM's preemption and ``scancel``, ``kill -TERM -PGID``): had it died,
the launcher would have read every worker as ended (exit 255) and left while they were still writing their
checkpoint.  A forked process takes SIGTERM's default action back as it ``arrive``s.

The cost: the server stays resident while the launcher lives (torch and the launcher imported: a few hundred
MB, shared copy-on-write with the workers it forks).  Where no server was started (Windows; Hydra's submitit
launcher, which calls the job function on the node without ``fdg_dist.train``) workers are spawned and ``call``
runs in this process.

Must stay light to import (no torch: it runs before the launcher's imports) and must not know about training.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import forkserver
from typing import Any, TypeVar

T = TypeVar("T")
_FORKSERVER = "forkserver"
_server_environment: dict[str, str] | None = None  # os.environ when this process started the server


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun started: it trains itself and forks nothing."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def start(preload: Iterable[str]) -> bool:
    """Start the fork server, which imports ``preload`` (a name that does not import is skipped), without
    waiting for it; returns whether one runs.  Once per process (its main thread): later calls change nothing."""
    global _server_environment
    if _server_environment is None and _FORKSERVER in multiprocessing.get_all_start_methods():
        forkserver.set_forkserver_preload(list(preload))
        _server_environment = dict(os.environ)
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # an ignored signal stays ignored across exec
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return _server_environment is not None


def start_method() -> str:
    """How torch's elastic agent starts workers: forked from the warm server where this process started one."""
    return _FORKSERVER if _server_environment is not None else "spawn"


def environment_since() -> dict[str, str | None]:
    """The variables set or changed (their value) and removed (``None``) in this process since it started the
    server: what a forked process must take on as it ``arrive``s to see this process's environment."""
    if _server_environment is None:
        return {}
    changes: dict[str, str | None] = {k: v for k, v in os.environ.items() if _server_environment.get(k) != v}
    changes.update({k: None for k in _server_environment if k not in os.environ})
    return changes


def arrive(changes: Mapping[str, str | None]) -> None:
    """The first thing a process forked from the server does: SIGTERM's default action back (the server
    ignores it), and ``environment_since``'s answer applied.  Harmless in a spawned process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _arriving(changes: Mapping[str, str | None], fn: Callable[..., T], args: tuple) -> T:
    arrive(changes)
    return fn(*args)


def call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh process forked from the server, its result or exception returned or raised here:
    what it imports or allocates (a model built on the meta device loads ~80 MB of torch) never stays in this
    process.  Runs here where this process started no server.  ``fn`` and ``args`` must pickle."""
    if _server_environment is None:
        return fn(*args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(_FORKSERVER)) as pool:
        return pool.submit(_arriving, environment_since(), fn, args).result()
