"""Checked P2P: a message that is not the one the schedule expects fails fast, naming the field."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdg_dist.transport import Envelope, Link, TorchWire, Transport, TransportError

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


def _pair(rank: int, port: int, sent: Envelope, expected: Envelope, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        links = {Link("act", 0, 1): dist.new_group([0, 1]), Link("grad", 1, 0): dist.new_group([0, 1])}
        wire = TorchWire([0, 1], links, None, torch.device("cpu"), "gloo")
        transport = Transport(wire, rank, torch.device("cpu"))
        if rank == 0:
            transport.post([(1, [sent], [torch.ones(sent.shape, dtype=sent.dtype)])], [])
            transport.drain()
            queue.put((0, "sent", 0.0))
        else:
            start = time.perf_counter()
            transport.post([], [(0, [expected])])
            try:
                (got,) = transport.take(expected.kind, expected.batch)
                queue.put((1, f"ok {got.sum().item()}", time.perf_counter() - start))
            except TransportError as e:
                queue.put((1, str(e), time.perf_counter() - start))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _exchange(sent: Envelope, expected: Envelope) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pair, args=(r, port, sent, expected, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (msg, dt)) for r, msg, dt in (queue.get(timeout=30) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    msg, seconds = results[1]
    assert seconds < 1.0 or msg.startswith("ok")
    return msg


def test_a_matching_message_arrives_intact() -> None:
    env = Envelope("act", 0, 0, 3, torch.float32, (2, 3))
    assert _exchange(env, env) == "ok 6.0"


def test_a_misrouted_batch_is_an_error_naming_batch_expected_and_actual_within_a_second() -> None:
    expected = Envelope("act", 0, 1, 5, torch.float32, (2, 3))
    sent = Envelope("act", 0, 1, 4, torch.float32, (2, 3))
    msg = _exchange(sent, expected)
    assert "header field 'batch' expected 5, got 4" in msg and "from module 0 (rank 0)" in msg
