"""The pipeline pace model: steady-state time per batch of a schedule from per-module costs and message times."""

from __future__ import annotations

import pytest

from fdg_dist.split.pace import BlockTime, module_times, period, start_times

EVEN = [BlockTime(0.4, 0.6, 0.0), BlockTime(0.4, 0.6, 0.0)]


def test_fdg_at_k2_is_paced_by_the_slowest_module_or_by_the_loop_through_the_next_one() -> None:
    """Module 0's backward of batch b waits for module 1's tick on b and two messages, while module 0 runs one
    tick of its own in between: per batch max(C0, C1, (C0 + C1 + 2L) / 2)."""
    assert period("fdg", EVEN, [0.0]) == pytest.approx(1.0)
    assert period("fdg", EVEN, [0.1]) == pytest.approx(1.1)  # the loop: (1 + 1 + 0.2) / 2
    heavy_first = [BlockTime(0.44, 0.66, 0.0), BlockTime(0.36, 0.54, 0.0)]
    assert period("fdg", heavy_first, [0.05]) == pytest.approx(1.1)  # module 0's own tick: the loop is 1.05
    assert period("fdg", heavy_first, [0.2]) == pytest.approx((1.1 + 0.9 + 0.4) / 2)


def test_locked_methods_pay_every_module_and_both_messages_per_batch() -> None:
    assert period("bp", EVEN, [0.1]) == pytest.approx(2.2)
    assert period("ddg", EVEN, [0.0]) == pytest.approx(2.0)


def test_one_module_is_its_own_time_and_steps_count() -> None:
    assert period("fdg", [BlockTime(0.3, 0.5, 0.2)], []) == pytest.approx(1.0)


def test_module_times_sum_blocks_and_recompute_adds_a_forward_to_the_backward() -> None:
    blocks = [BlockTime(0.1, 0.2, 0.01), BlockTime(0.2, 0.3, 0.02), BlockTime(0.3, 0.5, 0.03)]
    first, second = module_times(blocks, [0, 2, 3])
    assert (first.forward, first.backward, first.step) == pytest.approx((0.3, 0.5, 0.03))
    assert second.total == pytest.approx(0.83)
    plain = period("fdg", [first, second], [0.0])
    assert period("fdg", [first, second], [0.0], recompute=True) == pytest.approx(plain + first.forward)


def test_the_fill_and_drain_are_outside_the_steady_state() -> None:
    starts = start_times("fdg", EVEN, [0.0], 8)
    assert starts[0] == pytest.approx(0.4)  # module 1 waits for module 0's first forward
    assert [b - a for a, b in zip(starts[2:], starts[3:])] == pytest.approx([1.0] * 5)
