"""benchmarks/startup.py's arithmetic over a stamped console: the phases of a run and a sweep job's overhead."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark is a script directory, not a package
import startup  # noqa: E402

RUN = [(0.1, "[launcher] INFO starting"), (5.0, "12:00:00 [m0] INFO rank 0/2: module 0 of 2"),
       (7.5, "12:00:02 [m1] INFO run finished after 2 epoch(s)"), (7.5, "  training time  1.3 s"),
       (8.0, "<exit>"), (9.2, "<output closed>")]


def test_the_smoke_tests_phases_come_from_the_stamped_lines() -> None:
    assert startup.smoke_phases(RUN) == pytest.approx({
        "wall_s": 8.0, "first_worker_line_s": 5.0, "worker_line_to_finished_s": 2.5, "finished_to_exit_s": 0.5,
        "output_closed_s": 9.2})


def test_a_sweep_jobs_overhead_is_its_wall_time_less_its_training_time() -> None:
    lines = [(3.0, "=== sweep job 0: /tmp/s/0_beta=0.5"), (6.0, "  training time  1.5 s"),
             (6.5, "=== sweep job 1: /tmp/s/1_beta=1"), (9.0, "  training time  2.0 s"),
             (10.0, "<exit>"), (11.0, "<output closed>")]
    assert startup.sweep_overheads(lines) == pytest.approx([3.5 - 1.5, 3.5 - 2.0])
