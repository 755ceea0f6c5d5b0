"""Where a run listens and how its processes meet: on one machine every listener we open (our launcher's
rendezvous store, rank 0's process-group store, gloo) binds to 127.0.0.1, never to a wildcard address;
across machines (launch/multinode.sh) to the master address; the workers' store belongs to the current
attempt, so nothing a dead attempt published is used; every rank must see rank 0's run directory.

Listeners are read from /proc (``/proc/net/tcp{,6}`` and each process's socket inodes), as ``ss -ltnp`` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import REPO, TINY_RUN

from fdg_dist import cli
from fdg_dist.run import rendezvous

pytestmark = pytest.mark.multiprocess

WILDCARDS = {"0.0.0.0", "::"}
RUN = [*TINY_RUN, "data.train_size=3000", "logging.progress=never"]  # a few seconds of training to look at


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):  # the process ended meanwhile
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def listeners(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    owner = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            hexaddr, hexport = local.split(":")
            raw = bytes.fromhex(hexaddr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order 32-bit words
            found.append((owner[inode], socket.inet_ntop(family, raw), int(hexport, 16)))
    return found


def _wait_for_ranks(run_dir: Path, world: int, procs: list[subprocess.Popen]) -> None:
    """Until every rank logged that its process group is up (all listeners exist then)."""
    log, deadline = run_dir / "train.log", time.monotonic() + 120
    while not (log.exists() and all(f"rank {r}/{world}:" in log.read_text() for r in range(world))):
        assert time.monotonic() < deadline, "the run did not start"
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs if p.poll()]
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


# ----------------------------------------------------------------- one store
def test_listener_check_sees_torchs_wildcard_and_our_bound_store() -> None:
    """torch's own TCPStore server listens on every interface whatever host it is given; ours does not."""
    theirs = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ours = rendezvous.serve("127.0.0.1", 0, timedelta(seconds=10))
    mine = {port: addr for _, addr, port in listeners([os.getpid()])}
    assert mine[theirs.port] in WILDCARDS, mine
    assert mine[ours.port] == "127.0.0.1", mine


# --------------------------------------------------------- whole runs, one machine
LAUNCHES = {
    "fdg-train": lambda run: [sys.executable, "-m", "fdg_dist.train", *RUN, "pipeline.k=2", f"hydra.run.dir={run}"],
    "launch/local.sh": lambda run: [str(REPO / "launch" / "local.sh"), "2", *RUN, f"hydra.run.dir={run}"],
    "plain torchrun": lambda run: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node=2", "-m", "fdg_dist.train", *RUN, "pipeline.k=2",
                                   f"hydra.run.dir={run}"],
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_every_listener_of_a_one_machine_run_is_on_loopback(launch: str, tmp_path: Path) -> None:
    """Listening sockets of the launcher and both workers while they train.  Under plain torchrun the agent
    is torch's own (its stores listen on every interface); only the workers' sockets are ours there."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(LAUNCHES[launch](run_dir), cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_ranks(run_dir, 2, [proc])
        pids = process_tree(proc.pid)
        ours = pids[1:] if launch == "plain torchrun" else pids
        found = listeners(ours)
    finally:
        _stop([proc])
    # the launcher's rendezvous store (ours only), rank 0's process-group store, one gloo listener per rank
    assert len(found) >= (3 if launch == "plain torchrun" else 4), found
    assert {addr for _, addr, _ in found} == {"127.0.0.1"}, found


@pytest.mark.timeout(240)
def test_multinode_script_listens_on_the_master_address_and_trains(tmp_path: Path) -> None:
    """launch/multinode.sh on two "nodes" of this machine (IFNAME=lo, MASTER=127.0.0.1:PORT): torchrun's
    rendezvous on PORT and the workers' store on PORT+1, both on MASTER's address, nothing on a wildcard;
    the run completes on both nodes."""
    run_dir, port = tmp_path / "run", _free_port()
    nodes = [subprocess.Popen([str(REPO / "launch" / "multinode.sh"), "1", *RUN, "pipeline.k=2",
                               f"hydra.run.dir={run_dir}"], cwd=tmp_path, start_new_session=True, text=True,
                              env=_env(IFNAME="lo", NNODES="2", NODE_RANK=str(rank), MASTER=f"127.0.0.1:{port}",
                                       RUN_ID=f"net-{port}"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        _wait_for_ranks(run_dir, 2, nodes)
        found = listeners([pid for node in nodes for pid in process_tree(node.pid)])
        codes = [node.wait(timeout=200) for node in nodes]
    finally:
        _stop(nodes)
    assert {addr for _, addr, _ in found} == {"127.0.0.1"}, found
    assert {port, port + 1} <= {p for _, _, p in found}, found
    assert codes == [0, 0]
    assert (run_dir / "result.json").exists()


# ------------------------------------------------ the workers' store, per attempt
def _worker_env(rank: int, shared_port: int) -> dict[str, str]:
    """What torchrun's agent exports with TCPStore sharing on: every worker dials the agent's store."""
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(shared_port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


@pytest.mark.parametrize("stale", ["nobody listens", "another attempt's store"])
def test_rank_skips_the_store_a_dead_attempt_published(stale: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's shared store still holds what rank 0 of the previous attempt published; rank 1 of the new
    attempt, asking first, must wait for the new rank 0's store instead of using the old one."""
    timeout = timedelta(seconds=30)
    shared = rendezvous.serve("127.0.0.1", 0, timeout)  # plays torchrun's agent store
    old = rendezvous.serve("127.0.0.1", 0, timeout)  # plays the old attempt's job store, with its own token
    old.set("fdg/token", "old-attempt")
    if stale == "another attempt's store":  # e.g. its port now taken by a store of this attempt
        shared.set("fdg/job_store", f"127.0.0.1 {old.port} other-token")
    else:
        shared.set("fdg/job_store", f"127.0.0.1 {_free_port()} old-attempt")
    rejected = threading.Event()
    probe = rendezvous._probe

    def observed_probe(host: str, port: int, token: str, timeout: timedelta, env: dict) -> dist.Store | None:
        store = probe(host, port, token, timeout, env)
        if store is None:
            rejected.set()
        return store

    monkeypatch.setattr(rendezvous, "_probe", observed_probe)
    got: list[dist.Store] = []
    rank1 = threading.Thread(target=lambda: got.append(rendezvous.job_store(timeout, _worker_env(1, shared.port))))
    rank1.start()
    assert rejected.wait(timeout=30), "rank 1 never looked at the stale entry"
    rank0 = rendezvous.job_store(timeout, _worker_env(0, shared.port))
    rank1.join(timeout=60)
    assert got, "rank 1 found no store"
    rank0.set("hello", "from rank 0 of this attempt")
    assert got[0].get("hello") == b"from rank 0 of this attempt"


def test_explicit_master_needs_a_node_rank() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "FDG_MASTER_ADDR": "127.0.0.1", "FDG_MASTER_PORT": "1"}
    with pytest.raises(RuntimeError, match="FDG_NODE_RANK"):
        rendezvous.job_store(timedelta(seconds=5), env)


# -------------------------------------------------------------- run directory
@pytest.mark.timeout(120)
def test_ranks_that_do_not_share_the_run_directory_stop_at_start(tmp_path: Path) -> None:
    """Two ranks given different run directories (as two nodes without a shared filesystem would have):
    both stop before training, naming rank 1 and what to do."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "fdg_dist.train", *TINY_RUN, "pipeline.k=2", f"hydra.run.dir={tmp_path / f'node{rank}'}"],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="dirs")) for rank in (0, 1)]
    try:
        errors = [p.communicate(timeout=100)[1] for p in procs]
    finally:
        _stop(procs)
    assert [p.returncode for p in procs] != [0, 0]
    for err in errors:
        assert "ranks [1] do not see" in err and "hydra.run.dir" in err, err[-3000:]
    assert not (tmp_path / "node0" / "checkpoints").exists()


# ------------------------------------------------------- what the stores hold is the run's (issue 27)
def test_a_store_value_without_the_runs_signature_is_refused() -> None:
    """Any local process can connect to a run's stores, list, read and write their keys.  With the run's secret
    every value is signed; whatever a client without it writes is refused when read, never used."""
    timeout = timedelta(seconds=10)
    served = rendezvous.serve("127.0.0.1", 0, timeout)
    ours = rendezvous.SignedStore(served, b"the run's secret")
    key = "0//cpu//0/1"
    ours.set(key, b"\x01gloo address of rank 1")
    ours.set("0//cpu//0/0", b"\x01gloo address of rank 0")
    assert ours.get(key) == b"\x01gloo address of rank 1"
    stranger = rendezvous.connect("127.0.0.1", served.port, timeout)
    assert sorted(stranger.list_keys()) == ["0//cpu//0/0", key]  # not secret: readable, as before
    genuine = stranger.get(key)
    guessing = rendezvous.SignedStore(rendezvous.connect("127.0.0.1", served.port, timeout), b"a guess")
    forgeries = [lambda: stranger.set(key, b"\x01the stranger's own address"),
                 lambda: stranger.set(key, stranger.get("0//cpu//0/0")),  # another key's signed value
                 lambda: guessing.set(key, b"\x01the stranger's own address")]  # signed with another secret
    for forge in forgeries:
        forge()
        with pytest.raises(rendezvous.ForgedValue, match=rf"^store key '{key}' at 127\.0\.0\.1:{served.port} holds a "
                                                         "value this run did not write"):
            ours.get(key)
    other = rendezvous.SignedStore(rendezvous.serve("127.0.0.1", 0, timeout), b"the run's secret")
    rendezvous.connect("127.0.0.1", other.inner.port, timeout).set(key, genuine)  # replayed into another store
    with pytest.raises(rendezvous.ForgedValue):
        other.get(key)
    stranger.set(key, genuine)  # the genuine value put back reads again
    assert ours.get(key) == b"\x01gloo address of rank 1"


def test_a_forged_rendezvous_state_is_never_unpickled() -> None:
    """torch's c10d rendezvous keeps its state pickled in the agent's store and unpickles what it reads: a
    stranger's pickle there would run in the agent.  Signed, the state round-trips and a forged one is refused
    before it reaches pickle."""
    import base64
    import pickle

    from torch.distributed.elastic.rendezvous import RendezvousConnectionError
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    timeout = timedelta(seconds=10)
    served = rendezvous.serve("127.0.0.1", 0, timeout)
    backend = C10dRendezvousBackend(rendezvous.SignedStore(served, b"the run's secret"), "run")
    assert backend.get_state() is None
    state, token, ok = backend.set_state(b"round 1")
    assert (state, ok) == (b"round 1", True) and backend.get_state() == (b"round 1", token)
    state, token, ok = backend.set_state(b"round 2", token)  # compare-and-set against the signed value
    assert (state, ok) == (b"round 2", True)

    class Payload:
        def __reduce__(self) -> tuple:
            return exec, ("raise SystemExit('the stranger's code ran')",)

    stranger = rendezvous.connect("127.0.0.1", served.port, timeout)
    stranger.set("torch.rendezvous.run", base64.b64encode(pickle.dumps(Payload())))
    with pytest.raises(RendezvousConnectionError) as refused:
        backend.get_state()
    assert isinstance(refused.value.__cause__, rendezvous.ForgedValue)


def test_workers_with_the_runs_secret_refuse_what_a_stranger_wrote_in_their_store() -> None:
    """rank 0 serves the store the process groups are built on; rank 1 reads what rank 0 wrote, and refuses
    what a client without FDG_STORE_SECRET wrote there (e.g. a gloo address of its own for rank 0)."""
    timeout = timedelta(seconds=10)
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           rendezvous.SECRET: "a secret of this run"}
    rank0 = rendezvous.job_store(timeout, {**env, "RANK": "0"})
    rank1 = rendezvous.job_store(timeout, {**env, "RANK": "1"})
    rank0.set("default_pg/0//cpu//0/0", b"rank 0's address")
    assert rank1.get("default_pg/0//cpu//0/0") == b"rank 0's address"
    rendezvous.connect("127.0.0.1", int(env["MASTER_PORT"]), timeout).set("default_pg/0//cpu//0/0", b"elsewhere")
    with pytest.raises(rendezvous.ForgedValue):
        rank1.get("default_pg/0//cpu//0/0")
    del env[rendezvous.SECRET]  # a run without a secret (plain torchrun): values as they are, as before
    env["MASTER_PORT"] = str(_free_port())
    assert isinstance(rendezvous.job_store(timeout, {**env, "RANK": "0"}), dist.TCPStore)


def test_the_launcher_names_the_first_error_of_a_wrapped_chain() -> None:
    """torch's agent wraps a store's error in RendezvousConnectionError, and that again in RendezvousError when
    the call came from its state handler: the line must name the forgery, whichever depth the agent met it at."""
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousError

    forged = rendezvous.ForgedValue("store key 'k' at 127.0.0.1:1 holds a value this run did not write")
    for depth in range(3):
        error: BaseException = forged
        for wrapper in (RendezvousConnectionError, RendezvousError)[:depth]:
            try:
                raise wrapper("The connection to the C10d store has failed.") from error
            except wrapper as wrapped:
                error = wrapped
        assert cli._innermost(error) is forged


@pytest.mark.timeout(180)
def test_a_strangers_pickle_in_the_launchers_store_never_runs(tmp_path: Path) -> None:
    """The agent of fdg-train polls its rendezvous state (every 0.2 s) and unpickles it: a local process that
    wrote a pickle there ran its code in the launcher (it did, before: the file below was created).  Signed, the
    forgery is refused and the run stops with one line naming it."""
    import base64
    import pickle

    run_dir, ran = tmp_path / "run", tmp_path / "stranger-code-ran"
    proc = subprocess.Popen([sys.executable, "-m", "fdg_dist.train", *RUN, "pipeline.k=2", "trainer.epochs=50",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_ranks(run_dir, 2, [proc])
        [(_, _, port)] = listeners([proc.pid])  # the launcher listens once: its rendezvous store
        stranger = rendezvous.connect("127.0.0.1", port, timedelta(seconds=10))
        [key] = [k for k in stranger.list_keys() if k.startswith("torch.rendezvous.") and k.count(".") == 2]

        class Payload:
            def __reduce__(self) -> tuple:
                return exec, (f"open({str(ran)!r}, 'w').close()",)

        stranger.set(key, base64.b64encode(pickle.dumps(Payload())))
        _, err = proc.communicate(timeout=60)
    finally:
        _stop([proc])
    assert not ran.exists()
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith(
        f"fdg-train: the launcher's rendezvous failed, every worker was stopped: ForgedValue: store key {key!r} at "
        f"127.0.0.1:{port} holds a value this run did not write"), err[-3000:]
