"""The tick rule as data: exact delays, stash depths, message timing, per method (no process group)."""

from __future__ import annotations

import pytest

from fdg_dist.engine.schedule import Kind, grid, plan, program, train_actions

METHODS = ["fdg", "adl", "dgl", "ddg", "fr", "bp"]


def _ticks(method: str, k: int, K: int, n: int, kind: Kind, accum: int = 1) -> dict[int, int]:
    return {a.batch: a.tick for a in train_actions(method, k, K, n, accum) if a.kind is kind}


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_fdg_forward_and_backward_ticks_follow_spec(K: int) -> None:
    n = 7
    for k in range(K):
        assert _ticks("fdg", k, K, n, Kind.FORWARD) == {b: b + k for b in range(n)}
        steps = _ticks("fdg", k, K, n, Kind.STEP)
        # module k applies the gradient of batch b at tick b + 2(K-1) - k (last module: at its forward)
        assert steps == {b: b + 2 * (K - 1) - k for b in range(n)}


@pytest.mark.parametrize("K", [2, 3, 4])
def test_fdg_stash_never_exceeds_2_K_minus_1_minus_k(K: int) -> None:
    n = 9
    for k in range(K):
        held, peak = 0, 0
        for a in train_actions("fdg", k, K, n):
            if a.kind is Kind.FORWARD and k < K - 1:
                held += 1
            if a.kind is Kind.BACKWARD:
                held -= 1
            peak = max(peak, held)
        assert peak == 2 * (K - 1 - k)
        assert held == 0  # drained at epoch end


@pytest.mark.parametrize("K", [2, 3, 4])
def test_ddg_delay_is_K_minus_1_minus_k(K: int) -> None:
    n = 6
    for k in range(K):
        fwd = _ticks("ddg", k, K, n, Kind.FORWARD)
        step = _ticks("ddg", k, K, n, Kind.STEP)
        assert all(step[b] - fwd[b] == K - 1 - k for b in range(n))


def test_bp_applies_every_gradient_before_the_next_forward() -> None:
    K, n = 3, 4
    for k in range(K):
        acts = train_actions("bp", k, K, n)
        order = [(a.kind, a.batch) for a in acts]
        for b in range(n - 1):
            assert order.index((Kind.STEP, b)) < order.index((Kind.FORWARD, b + 1))


def test_adl_steps_every_M_backwards_and_at_epoch_end() -> None:
    K, n, M = 3, 10, 4
    for k in range(K):
        stepped = [a.batch for a in train_actions("adl", k, K, n, M) if a.kind is Kind.STEP]
        assert stepped == [3, 7, 9]


def test_dgl_sends_no_gradient() -> None:
    for k in range(3):
        p = plan("dgl", k, 3, 5, train=True)
        assert all(m.kind == "act" for m in p.sends + p.recvs)
        assert not [a for a in p.actions if a.kind is Kind.BACKWARD]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [2, 3, 4])
def test_every_message_is_consumed_strictly_after_it_is_sent(method: str, K: int) -> None:
    """The property the executor's deadlock freedom rests on; also: sends and receives pair up."""
    n = 5
    plans = [plan(method, k, K, n, train=True) for k in range(K)]
    sent = sorted(m for p in plans for m in p.sends)
    received = sorted(m for p in plans for m in p.recvs)
    assert sent == received
    for k, p in enumerate(plans):
        use = {(("act" if a.kind is Kind.FORWARD else "grad"), a.batch): a.time for a in p.actions
               if a.kind is not Kind.STEP}
        for m in p.recvs:
            assert use[(m.kind, m.batch)] > m.time, (k, m)


def test_eval_plan_is_forward_only_one_hop_per_tick() -> None:
    p = plan("fdg", 1, 3, 4, train=False)
    assert [(a.kind, a.batch, a.tick) for a in p.actions] == [(Kind.FORWARD, b, b + 1) for b in range(4)]
    assert [m.kind for m in p.sends] == ["act"] * 4


def test_grid_shows_the_pipeline() -> None:
    text = grid("fdg", 2, 2)
    assert text.splitlines()[1].split("|")[1:] == [" F0 ", " ."]
    assert "B0 S" in text  # module 0 back-propagates batch 0 at tick 2 = 0 + 2(K-1) - 0


@pytest.mark.parametrize("method", ["fdg", "adl", "dgl"])
@pytest.mark.parametrize("K", [2, 3, 4])
def test_receives_are_posted_an_action_before_the_one_that_takes_them(method: str, K: int) -> None:
    """gloo moves a message only once its receive is posted: posted right before the action that takes it, the
    rank waits for the whole transfer.  In the steady state of the decoupled methods (not in the fill, not in
    the drain, whose ticks have nothing else to run), some action of the rank's own runs between posting a
    receive and taking that message, so the transfer overlaps it."""
    n = 8
    for k in range(K):
        steps = program(plan(method, k, K, n, train=True, accum_steps=2 if method == "adl" else 1), K)
        posted_after: dict[tuple[str, int], int] = {}  # message -> actions this rank had run when it was posted
        done = 0
        for step in steps:
            for action, needs in step.actions:
                if needs is not None and 2 * (K - 1) <= action.tick < n:
                    assert done > posted_after[needs], (method, K, k, step.time, needs)
                done += 1
            for m in step.recvs:
                posted_after[(m.kind, m.batch)] = done


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [2, 3])
def test_a_cut_and_its_resumed_program_post_every_receive_once_in_order(method: str, K: int) -> None:
    """Cut after any tick: the steps up to it (the last posting only ``recvs_until``) and the program resumed
    after it (``program(after=tick)``) post exactly the uncut program's receives, in its order, and the
    steps before the cut post none of a message produced after it (no neighbour sends it before the resume)."""
    n = 6
    for k in range(K):
        p = plan(method, k, K, n, train=True, accum_steps=2 if method == "adl" else 1)
        whole = [m for step in program(p, K) for m in step.recvs]
        for tick in range(max(a.tick for a in p.actions) + 1):
            before = [step for step in program(p, K) if step.time[0] <= tick]
            cut = [m for step in before[:-1] for m in step.recvs] + (before[-1].recvs_until(tick) if before else [])
            assert all(m.time[0] <= tick for m in cut), (method, K, k, tick)
            resumed = [m for step in program(p, K, after=tick) for m in step.recvs]
            assert cut + resumed == whole, (method, K, k, tick)
