"""The warm fork server (run/warm.py): what a process forked from it sees of the launcher's environment, and
what comes back from a call made in it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fdg_dist.run import warm


def test_the_environment_since_the_server_started_is_what_a_forked_process_takes_on_as_it_arrives(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FDG_TEST_KEPT", "same")
    monkeypatch.setenv("FDG_TEST_CHANGED", "before")
    monkeypatch.setenv("FDG_TEST_REMOVED", "there")
    monkeypatch.delenv("FDG_TEST_ADDED", raising=False)
    monkeypatch.setattr(warm, "_server_environment", dict(os.environ))
    monkeypatch.setenv("FDG_TEST_CHANGED", "after")
    monkeypatch.setenv("FDG_TEST_ADDED", "new")
    monkeypatch.delenv("FDG_TEST_REMOVED")
    changes = warm.environment_since()
    assert changes == {"FDG_TEST_CHANGED": "after", "FDG_TEST_ADDED": "new", "FDG_TEST_REMOVED": None}
    assert warm.start_method() == "forkserver"

    # the forked process: the server's environment, then the changes
    monkeypatch.setenv("FDG_TEST_CHANGED", "before")
    monkeypatch.setenv("FDG_TEST_REMOVED", "there")
    monkeypatch.delenv("FDG_TEST_ADDED")
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as the server has it
    try:
        warm.arrive(changes)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (os.environ["FDG_TEST_KEPT"], os.environ["FDG_TEST_CHANGED"], os.environ["FDG_TEST_ADDED"]) == \
        ("same", "after", "new")
    assert "FDG_TEST_REMOVED" not in os.environ


def test_without_a_server_workers_are_spawned_and_a_call_runs_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm, "_server_environment", None)
    assert warm.start_method() == "spawn" and warm.environment_since() == {}
    assert warm.call(os.getpid) == os.getpid()


_CALLS = """
import os
from fdg_dist.run import warm

assert warm.start(["json"]) and warm.start(["this.is.never.imported"])  # once per process
os.environ["FDG_TEST_LATE"] = "set after the server started"
print("child:", warm.call(os.getpid) != os.getpid())
print("late:", warm.call(os.getenv, "FDG_TEST_LATE"))
try:
    warm.call(int, "not a number")
except ValueError as e:
    print("raised:", type(e).__name__)
"""


def test_a_call_runs_in_a_forked_process_that_sees_the_launchers_later_environment_and_raises_here() -> None:
    proc = subprocess.run([sys.executable, "-c", _CALLS], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["child: True", "late: set after the server started", "raised: ValueError"]


@pytest.mark.parametrize("variable", ["TORCHELASTIC_RUN_ID", "LOCAL_RANK"])
def test_a_torchrun_worker_is_recognised(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not warm.under_torchrun()
    monkeypatch.setenv(variable, "0")
    assert warm.under_torchrun()
