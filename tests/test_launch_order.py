"""One global launch order under NCCL, proven two ways, and every link's communicator made once, at start.

NCCL requires operations on several communicators of one device to follow one order on all ranks: a GPU
may run their kernels one at a time, and then a rank's operations complete in the order it issued them.
``launch_order`` proves that the union of every rank's issue order (``schedule.program(ordered=True)``, what
the executor runs under NCCL) is acyclic for every method, K, train/eval and cut-and-resumed program, and
the replay with a device-wide sync before every action finds no deadlock; the *serial* fabric runs the real
stages on a device that completes each rank's operations strictly in issue order, bit for bit equal to the
reference.  Today's order (``ordered=False``, kept for gloo) fails both for fdg and adl.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_weights, data_parallel_reference, reference_state, small_config
from emulated import merged_state, run_emulated

from fdg_dist.engine import schedule
from fdg_dist.engine.fabric import DeadlockError, Endpoint, Fabric, FabricError, launch_order, replay
from fdg_dist.engine.transport import Link, links_in_order

METHODS = ["fdg", "bp", "ddg", "fr", "dgl", "adl"]


def _programs(method: str, K: int, n: int, train: bool, *, ordered: bool = True, accum: int = 1, sync: int = 0,
              cut: int | None = None) -> list[list[list[schedule.Step]]]:
    """Every rank's program, or with ``cut`` the two programs of an epoch cut after that tick: the steps up to
    it (the last posting only ``recvs_until``) and the resumed program (the cut settles everything between)."""
    plans = [schedule.plan(method, k, K, n, train=train, accum_steps=accum, sync=sync) for k in range(K)]
    whole = [schedule.program(p, K, ordered=ordered) for p in plans]
    if cut is None:
        return [whole]
    first = []
    for steps in whole:
        before = [s for s in steps if s.time[0] <= cut]
        if before:
            last = before[-1]
            before[-1] = schedule.Step(last.time, last.actions, last.sends, last.recvs_until(cut), last.ahead)
        first.append(before)
    return [first, [schedule.program(p, K, after=cut, ordered=ordered) for p in plans]]


def _check(programs: list[list[schedule.Step]], whole: bool) -> None:
    """One launch order of every message posted; an uncut epoch also replays with a device-wide sync before
    every action (a cut's parts leave messages to the cut's settling and take them from it)."""
    posted = {m for steps in programs for step in steps for m in step.posts()}
    assert sorted(launch_order(programs)) == sorted(posted)
    if whole:
        assert replay(programs, device_sync=True) == sum(len(step.sends) for steps in programs for step in steps)


@pytest.mark.parametrize("method", METHODS)
def test_every_program_issues_in_one_global_launch_order(method: str) -> None:
    """method × K = 2..8 × train/eval × uncut and cut after every tick (and adl's accumulation, a synchronous
    warm-up): one global order exists, and device-wide syncs before every action cannot deadlock."""
    n, checked = 5, 0
    for K in range(2, 9):
        for train in (True, False):
            variants = [{}] + ([{"accum": 2}] if method == "adl" else []) + \
                ([{"sync": 2}] if train and method in ("fdg", "adl") else [])
            for extra in variants:
                ticks = max(a.tick for a in schedule.plan(method, 0, K, n, train=train, **{
                    "accum_steps": extra.get("accum", 1), "sync": extra.get("sync", 0)}).actions)
                for cut in [None, *range(ticks + 1)]:
                    for programs in _programs(method, K, n, train, cut=cut, **extra):
                        _check(programs, cut is None)
                        checked += 1
    assert checked > 7 * 2 * 5


@pytest.mark.parametrize("method", ["fdg", "adl"])
@pytest.mark.parametrize("K", [2, 5])
def test_the_early_gloo_order_has_no_launch_order_for_fdg_and_adl(method: str, K: int) -> None:
    """Today's order (every receive a step early, sends first): module K-2 posts the receive of a gradient
    before sending the activation the last module posted its receive for before sending that gradient."""
    (programs,) = _programs(method, K, 5, True, ordered=False)
    with pytest.raises(FabricError, match=rf"no global launch order: .*act {K - 2}->{K - 1}.*grad {K - 1}->{K - 2}"):
        launch_order(programs)
    with pytest.raises(DeadlockError, match="waits in a device-wide sync"):
        replay(programs, device_sync=True)


def test_the_ordered_program_keeps_every_receive_early_but_the_last_modules_activation() -> None:
    """What the order costs: in fdg only the last module's activation receives are posted at the
    time their neighbour sends them (after the last module's forward, before its step), every other one a step
    early, as on gloo; the actions and sends are the same."""
    K, n = 4, 8
    for k in range(K):
        p = schedule.plan("fdg", k, K, n, train=True)
        early, ordered = schedule.program(p, K), schedule.program(p, K, ordered=True)
        assert [(s.time, s.actions, sorted(s.sends)) for s in early] == \
            [(s.time, s.actions, sorted(s.sends)) for s in ordered]
        late = {m for s in ordered for m in s.recvs if m.time == s.time}
        # the last module's first activation comes before it sends anything: early too
        assert late == ({m for m in p.recvs if m.kind == "act" and m.batch > 0} if k == K - 1 else set())


# ------------------------------------------------------------------------------------ the serial device
def _cfg(method: str, K: int):
    extra = {"method.accum_steps": 3} if method == "adl" else {}
    return small_config(**{"method.name": method, "pipeline.k": K, "trainer.max_steps": 10, **extra})


@pytest.mark.parametrize("method,K", [(m, 3) for m in METHODS] + [("fdg", 2), ("adl", 2)])
def test_every_method_on_a_serial_device_equals_its_reference(method: str, K: int) -> None:
    """Each rank's communication completes strictly in its issue order across its links
    (``NCCL_LAUNCH_ORDER_IMPLICIT=1``): every method still finishes, bit for bit the reference."""
    cfg = _cfg(method, K)
    fabric = Fabric(["cpu"] * K, serial=True, timeout_s=60)
    state = merged_state(run_emulated(cfg, fabric=fabric))
    assert_same_weights(state, data_parallel_reference(cfg, replicas=1) if method == "bp" else reference_state(cfg))
    assert fabric.matched > 0 and fabric.lazy_opens == []


def test_todays_order_deadlocks_a_serial_device(monkeypatch) -> None:
    monkeypatch.setattr(Endpoint, "ordered", False)
    with pytest.raises(RuntimeError, match="every live rank waits"):  # through the transport: lost module …
        run_emulated(_cfg("fdg", 2), fabric=Fabric(["cpu"] * 2, serial=True, timeout_s=60), evaluate=False)


def test_a_serial_device_completes_a_rank_in_issue_order() -> None:
    """Rank 0 receives on the grad link before sending on the act link, rank 1 receives on the act link before
    sending on the grad link: links that progress independently finish, a serial device deadlocks."""
    act, grad = Link("act", 0, 1), Link("grad", 1, 0)

    def body(recv_link: Link, send_link: Link):
        def go(ep: Endpoint) -> None:
            for link in links_in_order(2):
                ep.open(link)
            got = ep.recv(torch.empty(1), recv_link)
            ep.send(torch.ones(1), send_link).wait()
            got.wait()
        return go

    Fabric(["cpu"] * 2, timeout_s=20).run([body(grad, act), body(act, grad)])
    with pytest.raises(DeadlockError, match="every live rank waits"):
        Fabric(["cpu"] * 2, serial=True, timeout_s=20).run([body(grad, act), body(act, grad)])


# ------------------------------------------------------------------------------- communicators at start
def test_every_link_is_opened_at_start_in_one_order_and_never_lazily() -> None:
    K = 4
    fabric = Fabric(["cpu"] * K)
    run_emulated(_cfg("fdg", K), fabric=fabric, evaluate=False)
    assert fabric.lazy_opens == []
    for k in range(K):
        assert [link for rank, link in fabric.opened if rank == k] == \
            [link for link in links_in_order(K) if k in (link.src, link.dst)]


def test_a_link_first_used_mid_run_shows_as_a_lazy_rendezvous(monkeypatch) -> None:
    """Without the opening at start every link's first message would be a rendezvous of its two ranks mid-run
    (NCCL's lazy communicator or connection set-up, which blocks the host): the fabric lists each one."""
    monkeypatch.setattr("fdg_dist.engine.transport.Transport.open", lambda self, K: None)
    fabric = Fabric(["cpu"] * 3)
    run_emulated(_cfg("fdg", 3), fabric=fabric, evaluate=False)
    assert len(fabric.lazy_opens) == 2 * len(links_in_order(3)) and fabric.opened == []
