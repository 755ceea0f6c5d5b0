"""The GPU path under NCCL's rules, on the CPU: the emulated fabric, its replay, and the runs through it.

Every method × K = 2..5 (with accumulation, train and evaluation) runs its real stages, executor and
transport on the fabric, which enforces what NCCL needs (one FIFO per link ignoring tags, rendezvous,
equal dtype and count, contiguous payloads on the rank's device, sent tensors unchanged until done) and
fails on a deadlock; each run equals its reference bitwise.  ``replay`` checks every rank's program for
many more shapes in milliseconds; a swapped pair of messages fails both.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_weights, data_parallel_reference, reference_state, small_config
from emulated import StopAt, merged_state, run_emulated

from fdg_dist import data, models
from fdg_dist.engine import schedule
from fdg_dist.engine.executor import Cut
from fdg_dist.engine.fabric import DeadlockError, Fabric, FabricError, replay
from fdg_dist.engine.transport import SEND_WINDOW, Link, Transport, TransportError, to_wire, wire_buffer

METHODS = ["fdg", "bp", "ddg", "fr", "dgl", "adl"]


def _cfg(method: str, K: int, **kw: object):
    extra = {"method.accum_steps": 3} if method == "adl" else {}
    if method == "fdg":
        extra["method.beta"] = 0.7
    # 6 batches, then 4: two drains crossed, the second after a cut epoch
    return small_config(**{"method.name": method, "pipeline.k": K, "trainer.max_steps": 10, **extra, **kw})


def _unsplit_eval(cfg, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sum and error count of the unsplit model with ``state`` on the test set, summed as a stage sums."""
    model = models.build(cfg.model.name, cfg.data.num_classes)
    model.load_state_dict(state)
    model.eval()
    _, test_set = data.load(cfg.data, cfg.trainer.seed)
    loader = data.Batches(test_set, cfg.trainer.eval_batch_size, train=False, augment=False, seed=cfg.trainer.seed)
    loss, errors = torch.zeros(()), torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        for x, y in loader.epoch(0):
            logits = model(x)
            loss += F.cross_entropy(logits.float(), y).float() * len(y)
            errors += (logits.argmax(dim=1) != y).sum()
    return loss, errors


@pytest.mark.parametrize("K", [2, 3, 4, 5])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_through_nccl_rules_equals_its_reference(method: str, K: int) -> None:
    cfg = _cfg(method, K)
    runs = run_emulated(cfg)
    state = merged_state(runs)
    want = data_parallel_reference(cfg, replicas=1) if method == "bp" else reference_state(cfg)
    assert_same_weights(state, want)
    loss, errors = _unsplit_eval(cfg, state)  # the last evaluation pass ran on the final weights
    last = runs[-1].evals[-1]
    assert torch.equal(last.loss_sum, loss) and torch.equal(last.errors, errors)


def test_recompute_through_nccl_rules_equals_its_reference() -> None:
    cfg = _cfg("fdg", 3, **{"method.stash": "recompute"})
    assert_same_weights(merged_state(run_emulated(cfg)), reference_state(cfg))


def test_mixed_stash_through_nccl_rules_equals_its_reference_and_differs_from_stashing() -> None:
    """method.stash=mixed (the authors' code under PyTorch 1.0: stored activations, live weights at backward)."""
    cfg = _cfg("fdg", 3, **{"method.stash": "mixed"})
    got = merged_state(run_emulated(cfg, evaluate=False))
    assert_same_weights(got, reference_state(cfg))
    stashed = reference_state(_cfg("fdg", 3))
    assert any(not torch.equal(got[n], stashed[n]) for n in stashed)


def test_nhwc_and_bf16_cross_the_wire_under_nccl_rules() -> None:
    """channels_last: the same model up to float rounding, NHWC on the wire; bf16: activations and gradients
    travel as bf16 and training stays finite."""
    got = merged_state(run_emulated(_cfg("fdg", 3, **{"trainer.channels_last": True}), evaluate=False))
    want = reference_state(_cfg("fdg", 3))
    for name in want:  # differently ordered float sums: ~1e-6 apart; a layout bug on the wire is O(1)
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=name)
    runs = run_emulated(_cfg("fdg", 2, **{"trainer.precision": "bf16"}), evaluate=False)
    assert runs[0].executor.boundary.dtype == torch.bfloat16 and torch.isfinite(runs[-1].train[-1].loss_sum)


def test_nhwc_goes_out_as_the_memory_it_is_and_comes_back_as_nhwc() -> None:
    x = torch.randn(4, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    wire = to_wire(x, torch.channels_last)
    assert wire.is_contiguous() and wire.data_ptr() == x.data_ptr() and wire.shape == (4, 5, 6, 8)  # no copy
    nchw = to_wire(x.contiguous(), torch.channels_last)  # the layout the receiver expects, whatever arrives
    assert torch.equal(nchw, wire) and to_wire(x).shape == (4, 8, 5, 6)
    buf, logical = wire_buffer((4, 8, 5, 6), torch.float32, torch.device("cpu"), torch.channels_last)
    buf.copy_(wire)
    assert logical.is_contiguous(memory_format=torch.channels_last) and torch.equal(logical, x)


# ------------------------------------------------------------------------------------------- replay
def _programs(method: str, K: int, n: int, train: bool, accum: int = 1,
              plan=schedule.plan, sync: int = 0) -> list[list[schedule.Step]]:
    return [schedule.program(plan(method, k, K, n, train=train, accum_steps=accum, sync=sync), K) for k in range(K)]


@pytest.mark.parametrize("window", [SEND_WINDOW, 0, 1])
def test_replay_proves_every_schedule_deadlock_free_and_fifo_consistent(window: int) -> None:
    """Also with the transport's wait for old sends, even at window 0 (every send waited for right after its
    time's posting: a blocking send), since every receive is posted a step before it is needed."""
    checked = 0
    for method in METHODS:
        for K in range(1, 8):
            for n in (1, 2, 5, 13):
                for accum in ((1, 3, 4) if method == "adl" else (1,)):
                    for train in (True, False):
                        programs = _programs(method, K, n, train, accum)
                        sent = sum(len(step.sends) for p in programs for step in p)
                        assert replay(programs, window=window) == sent
                        checked += 1
    assert checked == 448  # 6 methods × K 1..7 × 4 epoch lengths × (3 accumulations for adl) × train/eval


def test_replay_sees_two_ranks_that_wait_for_their_sends_before_posting_receives() -> None:
    """The NCCL deadlock of two ranks that both send first: harmless while sends are not waited for at once
    (window 1), a deadlock when they are (window 0): the replay models the transport's wait."""
    act, grad = schedule.Message((0, 2, 0, 0), 0, 1, "act", 0), schedule.Message((0, 0, 0, 0), 1, 0, "grad", 0)
    backward = schedule.Action((2, 0, 0, 0), 0, schedule.Kind.BACKWARD, 0)
    forward = schedule.Action((2, 2, 0, 0), 1, schedule.Kind.FORWARD, 0)
    programs = [[schedule.Step((0, 2, 0, 0), [], [act], []), schedule.Step((1, 0, 0, 0), [], [], [grad]),
                 schedule.Step(backward.time, [(backward, ("grad", 0))], [], [])],
                [schedule.Step((0, 0, 0, 0), [], [grad], []), schedule.Step((1, 0, 0, 0), [], [], [act]),
                 schedule.Step(forward.time, [(forward, ("act", 0))], [], [])]]
    assert replay(programs, window=1) == 2
    with pytest.raises(DeadlockError, match=r"module 0 at time \(0, 2, 0, 0\) waits for its sends of \[\('act', 0\)\]"):
        replay(programs, window=0)


def test_replay_proves_a_synchronous_warm_up_deadlock_free() -> None:
    """Back-propagation's locked rule for an epoch's first batches, then fdg's or adl's: every switch point,
    including none and the whole epoch, replays under NCCL's rules."""
    for method, accum in (("fdg", 1), ("adl", 2), ("adl", 3)):
        for K in (2, 3, 4):
            for sync in range(0, 8):
                programs = _programs(method, K, 7, True, accum, sync=sync)
                assert replay(programs) == sum(len(step.sends) for p in programs for step in p)


def _swap_two_receives(method: str, k: int, K: int, n: int, *, train: bool, accum_steps: int = 1,
                       sync: int = 0) -> schedule.Plan:
    """schedule.plan with module 1 posting its receives for batches 1 and 2 in the wrong order."""
    p = schedule.plan(method, k, K, n, train=train, accum_steps=accum_steps, sync=sync)
    if k != 1 or not train:
        return p
    recvs = list(p.recvs)
    i, j = (next(i for i, m in enumerate(recvs) if m.kind == "act" and m.batch == b) for b in (1, 2))
    recvs[i], recvs[j] = (dataclasses.replace(recvs[i], batch=2), dataclasses.replace(recvs[j], batch=1))
    return schedule.Plan(p.actions, p.sends, recvs)


def test_a_swapped_pair_of_messages_fails_the_replay_and_the_fabric() -> None:
    with pytest.raises(FabricError, match="sent act of batch 1 where module 1 expects act of batch 2"):
        replay(_programs("fdg", 3, 6, True, plan=_swap_two_receives))
    with pytest.raises(TransportError, match="act of batch 1"):
        run_emulated(_cfg("fdg", 3), plan=_swap_two_receives)


def test_a_message_whose_parts_go_out_in_another_order_fails_on_the_fabric(monkeypatch) -> None:
    """Labels posted before their activation on the sender only: headers travel per tag (gloo) and still
    match, but the payload link is one FIFO (NCCL), so the receiver's activation buffer meets int64 labels —
    silent garbage on a GPU, an error here."""
    post = Transport.post

    def labels_first(self, sends, recvs):
        post(self, [(peer, envs[::-1], tensors[::-1]) for peer, envs, tensors in sends], recvs)

    monkeypatch.setattr(Transport, "post", labels_first)
    with pytest.raises(FabricError, match="dtype torch.int64 sent, torch.float32 expected"):
        run_emulated(_cfg("fdg", 2))


# ---------------------------------------------------------------------------------------- the rules
def _pair(body0, body1) -> list:
    return Fabric(["cpu", "cpu"], timeout_s=20).run([body0, body1])


A = Link("act", 0, 1)


def test_fabric_matches_a_link_in_order_and_delivers() -> None:
    def send(ep):
        for i in range(3):
            ep.send(torch.full((4,), float(i)), A)
        return None

    def recv(ep):
        bufs = [torch.empty(4) for _ in range(3)]
        works = [ep.recv(b, A) for b in bufs]
        for w in works:
            w.wait()
        return [b[0].item() for b in bufs]

    assert _pair(send, recv)[1] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("sent,expected,match", [
    (torch.ones(4, dtype=torch.bfloat16), torch.empty(4), "dtype torch.bfloat16 sent, torch.float32 expected"),
    (torch.ones(6), torch.empty(4), "6 elements sent, 4 expected"),
])
def test_fabric_refuses_what_nccl_would_reinterpret_or_truncate(sent, expected, match) -> None:
    with pytest.raises(FabricError, match=match):
        _pair(lambda ep: ep.send(sent, A).wait(), lambda ep: ep.recv(expected, A).wait())


def test_fabric_refuses_non_contiguous_and_foreign_device_payloads() -> None:
    fabric = Fabric(["cpu", "meta"])
    with pytest.raises(FabricError, match="not contiguous"):
        fabric.endpoint(0).send(torch.ones(4, 4).t(), A)
    with pytest.raises(FabricError, match="payload on cpu; NCCL moves tensors of the rank's device meta"):
        fabric.endpoint(1).recv(torch.empty(4), A)


@pytest.mark.parametrize("completion", ["gloo", "nccl"])
@pytest.mark.parametrize("K", [2, 4])
def test_a_link_keeps_at_most_its_window_of_sends_alive_however_long_the_epoch(K: int, completion: str) -> None:
    """An epoch of 40 batches (and an evaluation): while a time's messages are posted every link holds the
    payloads of at most SEND_WINDOW + 1 messages (an activation message is the activation and its labels),
    counted by the fabric as the sent tensors still alive, not by the transport's own bookkeeping; also where
    a send reports completion only once waited for (gloo).  Every send is let go at the drain."""
    cfg = small_config(**{"pipeline.k": K, "trainer.epochs": 1, "data.train_size": 160, "trainer.batch_size": 4})
    fabric = Fabric(["cpu"] * K, completion=completion)
    runs = run_emulated(cfg, fabric=fabric)
    assert len(runs[0].train[0].events) == 3 * 40  # forward, backward, step
    links = {Link("act", k, k + 1): 2 for k in range(K - 1)} | {Link("grad", k, k - 1): 1 for k in range(1, K)}
    assert fabric.max_live_sends == {link: n * (SEND_WINDOW + 1) for link, n in links.items()}
    assert [fabric.live_sends(link) for link in links] == [0] * len(links)


def test_a_gloo_send_reports_completion_only_once_waited_for() -> None:
    """What torch 2.14.1's gloo does (SPEC §5), emulated: a delivered send stays 'not completed' until wait()."""
    fabric = Fabric(["cpu", "cpu"], completion="gloo")
    sent = fabric.endpoint(0).send(torch.ones(2), A)
    fabric.endpoint(1).recv(torch.empty(2), A).wait()
    assert not sent.is_completed()
    sent.wait()
    assert sent.is_completed()


def test_fabric_refuses_a_send_tensor_modified_before_the_send_completed() -> None:
    posted = threading.Event()

    def send(ep):
        t = torch.ones(4)
        work = ep.send(t, A)
        t.add_(1)  # NCCL may still be reading it
        posted.set()
        work.wait()

    def recv(ep):
        posted.wait()
        ep.recv(torch.empty(4), A).wait()

    with pytest.raises(FabricError, match="modified"):
        _pair(send, recv)


def test_fabric_finds_the_deadlock_of_two_ranks_waiting_for_each_other() -> None:
    grad = Link("grad", 1, 0)
    with pytest.raises(DeadlockError, match="every live rank waits"):
        _pair(lambda ep: ep.recv(torch.empty(2), grad).wait(), lambda ep: ep.recv(torch.empty(2), A).wait())


def test_a_failed_rank_is_named_by_its_neighbour_as_a_lost_module() -> None:
    """A rank that dies mid-run: its neighbour's wait fails as gloo's closed socket does, and the transport
    turns that into one line naming the lost module (not the raw backend error)."""
    def die_after_two_backwards(k, run):
        if k == 1:
            calls = {"n": 0}
            original = run.stage.backward

            def backward(*a, **kw):
                calls["n"] += 1
                if calls["n"] > 2:
                    raise RuntimeError("simulated crash of module 1")
                return original(*a, **kw)

            run.stage.backward = backward

    with pytest.raises(RuntimeError, match="simulated crash") as info:
        run_emulated(_cfg("fdg", 3), setup=die_after_two_backwards)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "TransportError: lost module 1 (rank 1) while waiting for" in notes


# ------------------------------------------------------------------------------------- cut and resume
@pytest.mark.parametrize("method,K,tick", [("fdg", 3, 3), ("fdg", 2, 1), ("adl", 3, 4), ("ddg", 3, 2), ("dgl", 2, 3),
                                          ("bp", 2, 4)])
def test_an_epoch_cut_after_any_tick_resumes_bit_for_bit(method: str, K: int, tick: int, tmp_path) -> None:
    """Stop every rank after the same tick mid-epoch (stash, accumulated gradients and messages in flight),
    save each stage's state and cut through torch.save/load (weights_only, as a checkpoint), rebuild the
    pipeline from them, finish: the final weights equal the uninterrupted run's bit for bit."""
    cfg = _cfg(method, K)
    want = merged_state(run_emulated(cfg, evaluate=False))
    stop = StopAt(epoch=0, tick=tick)
    first = run_emulated(cfg, evaluate=False, stop=stop)
    cuts = [run.train[-1].stopped for run in first]
    assert all(c is not None and c.tick == tick for c in cuts)
    assert sum(len(run.stage.stash) for run in first) > 0 or method in ("dgl", "bp")  # something was in flight
    saved = tmp_path / "cut.pt"
    torch.save({"states": [run.stage.state_dict() for run in first], "cuts": [dataclasses.asdict(c) for c in cuts]},
               saved)
    loaded = torch.load(saved, weights_only=True)
    second = run_emulated(cfg, evaluate=False,
                          resume=(0, loaded["states"], [Cut(**c) for c in loaded["cuts"]]))
    assert_same_weights(merged_state(second), want)
