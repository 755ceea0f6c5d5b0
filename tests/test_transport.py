"""Checked P2P: a message that is not the one the schedule expects fails fast, naming the field."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdg_dist.engine.transport import SEND_WINDOW, Envelope, Link, TorchWire, Transport, TransportError

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


def test_envelope_round_trip_and_field_names() -> None:
    env = Envelope("act", 0, 2, 7, torch.float32, (4, 16, 8, 8))
    env.check(env.encode(), peer=0)
    wrong = Envelope("act", 0, 2, 8, torch.float32, (4, 16, 8, 8)).encode()
    with pytest.raises(TransportError, match="'batch' expected 7, got 8"):
        env.check(wrong, peer=0)
    with pytest.raises(TransportError, match="'dtype' expected torch.float32, got torch.bfloat16"):
        env.check(Envelope("act", 0, 2, 7, torch.bfloat16, (4, 16, 8, 8)).encode(), peer=0)
    with pytest.raises(TransportError, match=r"'shape' expected \(4, 16, 8, 8\), got \(4, 8, 16, 8\)"):
        env.check(Envelope("act", 0, 2, 7, torch.float32, (4, 8, 16, 8)).encode(), peer=0)


def _pair(rank: int, port: int, sent: Envelope, expected: Envelope, queue: mp.Queue, release: mp.Event) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        links = {Link("act", 0, 1): dist.new_group([0, 1]), Link("grad", 1, 0): dist.new_group([0, 1])}
        wire = TorchWire([0, 1], links, None, torch.device("cpu"), "gloo")
        transport = Transport(wire, rank, torch.device("cpu"))
        transport.open(2)  # both links, in one order on both ranks, through batch_isend_irecv as every message
        if rank == 0:
            transport.post([(1, [sent], [torch.ones(sent.shape, dtype=sent.dtype)])], [])
            transport.drain()
            release.wait()  # alive and connected until the receiver has answered
        else:
            transport.post([], [(0, [expected])])
            try:
                (got,) = transport.take(expected.kind, expected.batch)
                queue.put(f"ok {got.sum().item()}")
            except TransportError as e:
                queue.put(str(e))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _exchange(sent: Envelope, expected: Envelope) -> str:
    """What the receiver got or raised, answered while the sender still runs: an error cannot have come
    from the sender ending or from a timeout (none is shorter than the wait here), only from the header."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_pair, args=(r, port, sent, expected, queue, release)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        msg = queue.get(timeout=45)
        assert procs[0].is_alive(), "the sender ended before the receiver answered"
    finally:
        release.set()
        for p in procs:
            p.join(timeout=30)
    return msg


def test_a_matching_message_arrives_intact() -> None:
    env = Envelope("act", 0, 0, 3, torch.float32, (2, 3))
    assert _exchange(env, env) == "ok 6.0"


def test_a_misrouted_batch_is_an_error_naming_batch_expected_and_actual_at_once() -> None:
    expected = Envelope("act", 0, 1, 5, torch.float32, (2, 3))
    sent = Envelope("act", 0, 1, 4, torch.float32, (2, 3))
    msg = _exchange(sent, expected)
    assert "header field 'batch' expected 5, got 4" in msg and "from module 0 (rank 0)" in msg


N_MESSAGES = 40


def _stream(rank: int, port: int, queue: mp.Queue) -> None:
    """Rank 0 sends N_MESSAGES activation messages to rank 1, one per schedule time; reports what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # gloo's completion, as SPEC §5 says: a send the peer provably received reports not completed until waited
        if rank == 0:
            sent = dist.isend(torch.ones(1000), 1)
            dist.recv(torch.empty(1), 1)  # rank 1 answers only after its receive completed
            queue.put(("completed before wait", sent.is_completed()))
            sent.wait()
            queue.put(("completed after wait", sent.is_completed()))
        else:
            dist.irecv(torch.empty(1000), 0).wait()
            dist.send(torch.ones(1), 0)
        links = {Link("act", 0, 1): dist.new_group([0, 1]), Link("grad", 1, 0): dist.new_group([0, 1])}
        transport = Transport(TorchWire([0, 1], links, None, torch.device("cpu"), "gloo"), rank, torch.device("cpu"))
        envs = [Envelope("act", 0, 0, b, torch.float32, (4, 256)) for b in range(N_MESSAGES)]
        if rank == 0:
            most = 0
            for env in envs:
                transport.post([(1, [env], [torch.full(env.shape, float(env.batch))])], [])
                most = max(most, *transport.in_flight().values())
            transport.drain()
            queue.put(("most in flight", most))
            queue.put(("in flight after the drain", transport.in_flight()))
        else:
            for env in envs:
                transport.post([], [(0, [env])])
                (got,) = transport.take("act", env.batch)
                assert torch.equal(got, torch.full(env.shape, float(env.batch)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_gloo_link_keeps_at_most_its_window_of_sends() -> None:
    """Real gloo: a send the peer has received still reports not completed until waited for, so polling
    ``is_completed()`` would keep every message; the transport waits for the ones SEND_WINDOW messages old,
    so over 40 messages it never holds more than SEND_WINDOW, and none after the drain."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_stream, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        seen = dict(queue.get(timeout=45) for _ in range(4))
    finally:
        for p in procs:
            p.join(timeout=30)
    assert seen == {"completed before wait": False, "completed after wait": True, "most in flight": SEND_WINDOW,
                    "in flight after the drain": {}}
    assert [p.exitcode for p in procs] == [0, 0]
