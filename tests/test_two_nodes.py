"""Two machines for real (issue 31): two network namespaces joined by a veth pair (``tests/two_nodes.sh``),
each "node" with its own network stack, interface ``fdg0`` and address, running ``launch/multinode.sh`` (or
``launch/slurm.sbatch`` through stand-ins for srun and scontrol) exactly as the README shows it.

What only exists between machines: each node's own address and interface, MASTER being another host, the
two ports node 0 listens on, a node that never arrives, a firewalled port, a worker lost on the other node
and the restart of both.  The run directory is one directory both nodes see (the namespaces share this
machine's files, as nodes share a cluster filesystem); each node works in a directory of its own.

Needs root and ``ip`` (skipped otherwise); the blocked-port test needs ``nft``.  ``pytest -m long
tests/test_two_nodes.py``; the last three test functions (the product's messages) run anywhere, in the
default suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, assert_same_weights, final_state, run_pipeline
from hydra import compose, initialize_config_dir
from netns import ADDRESSES, IFNAME, MASTER, PORT, Nodes, finish, make, needs_nft, user_env, workers
from torch.distributed.elastic.rendezvous import RendezvousParameters, RendezvousTimeoutError

from fdg_dist.cli import CONF_DIR, config_from_hydra
from fdg_dist.run import rendezvous

pytestmark = pytest.mark.multiprocess

_made = 0


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    """Two fresh namespaces; removed with every process started in them, pass or fail."""
    global _made
    _made += 1
    made = make(f"fdg{os.getpid()}n{_made}")
    try:
        yield made
    finally:
        made.close()


def _one_node(overrides: list[str], run_dir: Path) -> Path:
    """The same composed configuration launched on one node (fdg-train's own launcher)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = config_from_hydra(compose("train", overrides=overrides))
    run_pipeline(cfg, run_dir)
    return run_dir


def _both_succeed(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    outs = finish(procs, timeout)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(err[-3000:] for _, err in outs)
    return outs


def _wait_for(condition: Callable[[], bool], procs: list[subprocess.Popen], what: str, timeout: float = 120) -> None:
    """Until ``condition()``; fails if one of ``procs`` ends first (their output is small: nobody reads the pipes
    meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a node ended before {what}: {''.join(o or '' for o in p.communicate())[-3000:]}")
        time.sleep(0.1)


def _ranks_up(run_dir: Path, world: int) -> bool:
    log = run_dir / "train.log"
    return log.exists() and all(f"rank {r}/{world}:" in log.read_text() for r in range(world))


# ------------------------------------------------------------------------------- two nodes train like one
# The README's two-node commands: the smoke test's configuration with the counted split (the default measures
# it, and a measured split may differ between two runs: these are compared bitwise).
DEMO = {2: ["experiment=quick_synthetic", "pipeline.cost=flops"],
        4: ["experiment=quick_synthetic", "pipeline.cost=flops", "pipeline.k=4"]}


@pytest.mark.long
@pytest.mark.timeout(240)
@pytest.mark.parametrize("k", [2, 4], ids=["K=2 one module per node", "K=4 two per node"])
def test_two_nodes_train_like_one_node_bitwise(k: int, nodes: Nodes, tmp_path: Path) -> None:
    """``launch/multinode.sh K/2 DEMO hydra.run.dir=<shared>`` on both nodes, the final model equal to the same
    composed configuration's on one node."""
    overrides, run_dir = DEMO[k], tmp_path / "run"
    procs = [nodes.launch(n, k // 2, [*overrides, f"hydra.run.dir={run_dir}"], tmp_path / f"node{n}",
                          RUN_ID=f"k{k}") for n in (0, 1)]
    _both_succeed(procs, 200)
    log = (run_dir / "train.log").read_text()
    assert all(f"rank {r}/{k}:" in log for r in range(k)), log
    assert_same_weights(final_state(run_dir), final_state(_one_node(overrides, tmp_path / "one_node")))
    assert json.loads((run_dir / "result.json").read_text())["k"] == k
    assert not [p for n in (0, 1) for p in (tmp_path / f"node{n}").iterdir()], "a node wrote into its own directory"


# ------------------------------------------------------------------------------------------ who listens
@pytest.mark.long
@pytest.mark.timeout(180)
def test_every_listener_is_on_its_nodes_own_address(nodes: Nodes, tmp_path: Path) -> None:
    """K = 4, two ranks per node, while it trains.  Node 0: torchrun's rendezvous on PORT (its launcher), the
    workers' store on PORT+1 and gloo's sockets, all on 10.231.0.1; node 1: only its workers' gloo sockets, on
    10.231.0.2; nothing on a wildcard or loopback address, node 1's launcher listens on nothing."""
    run_dir = tmp_path / "run"
    overrides = [*TINY_RUN, "pipeline.k=4", "data.train_size=100000", f"hydra.run.dir={run_dir}"]
    procs = [nodes.launch(n, 2, overrides, tmp_path / f"node{n}", RUN_ID="listen") for n in (0, 1)]
    _wait_for(lambda: _ranks_up(run_dir, 4), procs, "every rank is up")
    found = [nodes.listeners(n) for n in (0, 1)]
    ranks = [workers(p) for p in procs]
    for n in (0, 1):
        assert found[n], f"node {n} listens on nothing: the snapshot missed the run"
        assert {s.address for s in found[n]} == {ADDRESSES[n]}, f"node {n}: {found[n]}"
    ports = [{s.port for s in found[n]} for n in (0, 1)]
    assert {PORT, PORT + 1} <= ports[0], found[0]
    assert [s.pids for s in found[0] if s.port == PORT] == [(procs[0].pid,)], "node 0's launcher serves PORT"
    assert not {PORT, PORT + 1} & ports[1], found[1]
    owners = {pid for s in found[1] for pid in s.pids}
    assert owners and owners <= set(ranks[1]), f"node 1: {found[1]}, its workers {ranks[1]}"


# ------------------------------------------------------------------------------- a worker lost on node 1
RESTART_RUN = [*TINY_RUN, "pipeline.k=2", "trainer.epochs=3", "data.train_size=2400", "checkpoint.enabled=true",
               "resume=auto"]
SAME_FIELDS = ("epoch", "lr", "train_loss", "train_error", "test_loss", "test_error")  # not the timings


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RESTART_RUN on one node, never interrupted."""
    return _one_node(RESTART_RUN, tmp_path_factory.mktemp("uninterrupted") / "run")


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in SAME_FIELDS} for r in rows]


def _assert_resumed_bitwise(run_dir: Path, reference: Path) -> None:
    log = (run_dir / "train.log").read_text()
    assert log.count("resumed from") == 2, log  # both ranks, once each
    assert_same_weights(final_state(run_dir), final_state(reference))
    assert _metrics(run_dir) == _metrics(reference)


@pytest.mark.long
@pytest.mark.timeout(240)
def test_worker_killed_on_node_1_restarts_both_nodes_and_resumes_bitwise(nodes: Nodes, tmp_path: Path,
                                                                         uninterrupted: Path) -> None:
    """Once epoch 1's checkpoint is committed, SIGKILL node 1's worker: both launchers restart their workers
    (MAX_RESTARTS=1, plain torchrun --max-restarts), which resume from the newest checkpoint, and the run ends
    equal to the uninterrupted one, weights and metrics.  Layout: one run directory on the filesystem both
    nodes share; each rank writes its module's file there, rank 0 the manifest."""
    run_dir = tmp_path / "run"
    procs = [nodes.launch(n, 1, [*RESTART_RUN, f"hydra.run.dir={run_dir}"], tmp_path / f"node{n}",
                          RUN_ID="restart", MAX_RESTARTS="1") for n in (0, 1)]
    first = run_dir / "checkpoints" / "epoch0000" / "manifest.json"
    _wait_for(first.exists, procs, "epoch 1's checkpoint is committed")
    (victim,) = workers(procs[1])
    os.kill(victim, signal.SIGKILL)
    _both_succeed(procs, 200)
    log = (run_dir / "train.log").read_text()
    assert log.count(": module ") == 4, log  # each rank started twice: both nodes restarted their workers
    _assert_resumed_bitwise(run_dir, uninterrupted)
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert sorted(f.name for f in newest.iterdir()) == ["manifest.json", "module0-replica0.pt", "module1-replica0.pt"]
    assert not [p for n in (0, 1) for p in (tmp_path / f"node{n}").iterdir()], "a node wrote into its own directory"


@pytest.mark.long
@pytest.mark.timeout(180)
def test_node_local_run_directories_stop_both_nodes_at_start(nodes: Nodes, tmp_path: Path) -> None:
    """Nodes without a shared filesystem (each its own run directory): every rank checks at start that it sees
    rank 0's directory; both nodes stop before training, each with one line naming the rank that does not."""
    procs = [nodes.launch(n, 1, [*TINY_RUN, "pipeline.k=2", f"hydra.run.dir={tmp_path / f'node{n}' / 'run'}"],
                          tmp_path / f"node{n}", RUN_ID="local") for n in (0, 1)]
    outs = finish(procs, 150)
    assert [p.returncode for p in procs] == [1, 1]
    for _, err in outs:
        lines = [line for line in err.splitlines() if line.startswith("fdg-train:")]
        assert len(lines) == 1 and "do not see" in lines[0] and "hydra.run.dir" in lines[0], err[-3000:]
    assert not any((tmp_path / f"node{n}" / "run" / "checkpoints").exists() for n in (0, 1))


# ----------------------------------------------------------------------- a node that never comes, a firewall
RDZV_TIMEOUT = 15


@pytest.mark.long
@pytest.mark.timeout(120)
@pytest.mark.parametrize("missing", [1, 0])
def test_a_node_that_never_starts_ends_the_other_in_one_line(missing: int, nodes: Nodes, tmp_path: Path) -> None:
    """Only one node is started: within RDZV_TIMEOUT it stops, its whole output one line.  Node 0 names the
    node that did not join; node 1, finding nobody at MASTER, names the address and port it waited for."""
    present = 1 - missing
    started = time.monotonic()
    proc = nodes.launch(present, 1, [*TINY_RUN, "pipeline.k=2", f"hydra.run.dir={tmp_path / 'run'}"],
                        tmp_path / f"node{present}", RUN_ID="alone", RDZV_TIMEOUT=str(RDZV_TIMEOUT))
    ((out, err),) = finish([proc], RDZV_TIMEOUT + 60)
    took = time.monotonic() - started
    assert proc.returncode == 1 and out == ""
    assert len(err.splitlines()) == 1, err
    if missing == 1:
        assert err.startswith(f"fdg-rendezvous: the rendezvous at {MASTER} timed out after {RDZV_TIMEOUT} s: "
                              "node 1 of 2 did not join"), err
    else:
        assert err.startswith(f"fdg-rendezvous: cannot reach {MASTER} within {RDZV_TIMEOUT} s; nothing listens"), err
    assert RDZV_TIMEOUT <= took < RDZV_TIMEOUT + 45, took


@pytest.mark.long
@pytest.mark.timeout(150)
@pytest.mark.parametrize("port", [PORT, PORT + 1], ids=["rendezvous PORT", "workers' store PORT+1"])
def test_a_port_blocked_on_node_0_ends_both_nodes_with_one_line_naming_it(port: int, nodes: Nodes,
                                                                          tmp_path: Path) -> None:
    """A firewall on node 0 drops what node 1 sends to ``port``.  PORT: node 1's launcher cannot reach the
    rendezvous (one line naming it), node 0's says node 1 did not join.  PORT+1: the rendezvous succeeds; the
    worker on node 1 cannot reach the workers' store (one line naming it), node 0's worker says how many ranks
    reached it.  Neither node hangs past its timeout; no Python traceback."""
    needs_nft()
    nodes.block(0, port)
    timeout = RDZV_TIMEOUT
    overrides = [*TINY_RUN, "pipeline.k=2", f"dist.timeout_s={timeout}", f"hydra.run.dir={tmp_path / 'run'}"]
    procs = [nodes.launch(n, 1, overrides, tmp_path / f"node{n}", RUN_ID="blocked", RDZV_TIMEOUT=str(timeout))
             for n in (0, 1)]
    outs = finish(procs, 2 * timeout + 60)
    assert [p.returncode for p in procs] == [1, 1]
    errs = [err for _, err in outs]
    for err in errs:
        assert "Traceback" not in err, err[-3000:]
    where = f"{ADDRESSES[0]}:{port}"
    if port == PORT:
        assert errs[1].splitlines() == [f"fdg-rendezvous: cannot reach {where} within {timeout} s; no answer from "
                                        f"{where} (timed out): a firewall drops TCP port {port} on the way to "
                                        f"{ADDRESSES[0]}, or {ADDRESSES[0]} is not that node's address"], errs[1]
        assert len(errs[0].splitlines()) == 1 and "node 1 of 2 did not join" in errs[0], errs[0]
        return
    mine = [[line for line in err.splitlines() if line.startswith("fdg-train:")] for err in errs]
    assert [len(m) for m in mine] == [1, 1], errs
    assert f"cannot reach {where} within {timeout} s; no answer" in mine[1][0], mine
    assert f"only 1 of 2 ranks reached the workers' store at {where} (node 0)" in mine[0][0], mine


# ---------------------------------------------------------------------------------------------------- SLURM
SRUN = """#!/usr/bin/env bash
# srun across the two namespaces: one task per node, node i in {ns}-i with SLURM_NODEID=i; signals reach both
while [[ $1 == --* ]]; do shift; done
tasks=()
for i in 0 1; do SLURM_NODEID=$i ip netns exec {ns}-$i "$@" & tasks+=($!); done
trap 'kill -TERM "${{tasks[@]}}" 2>/dev/null' TERM INT
status=0
for t in "${{tasks[@]}}"; do
  wait "$t"; s=$?
  while kill -0 "$t" 2>/dev/null; do wait "$t"; s=$?; done  # a trapped signal interrupts wait
  [ "$s" = 0 ] || status=$s
done
exit $status
"""


@pytest.mark.long
@pytest.mark.timeout(300)
def test_slurm_job_on_two_nodes_requeues_at_the_time_limit_and_resumes_bitwise(nodes: Nodes, tmp_path: Path,
                                                                              uninterrupted: Path) -> None:
    """``launch/slurm.sbatch`` run on node 0 as SLURM would (SLURM_NNODES=2, IFNAME, one task per node by
    srun).  SIGUSR1 (--signal=B:USR1@180) after the first epoch: both nodes' workers checkpoint and stop, the
    job requeues itself under its id; the requeued job (the same script again) resumes, and ends bitwise
    equal to the uninterrupted run."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.format(ns=nodes.name))
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = user_env(IFNAME=IFNAME, PORT=str(PORT), SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="1",
                   SLURM_SUBMIT_DIR=str(REPO))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    job_dir = tmp_path / "job"  # sbatch's working directory; outputs/torchrun-4242 under it, seen by both nodes
    run_dir = job_dir / "outputs" / "torchrun-4242"

    def submit() -> subprocess.Popen:
        return nodes.start(0, ["bash", str(REPO / "launch" / "slurm.sbatch"), *RESTART_RUN], job_dir, env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    job = submit()
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists(), [job], "the first epoch ended")
    job.send_signal(signal.SIGUSR1)
    ((out, _),) = finish([job], 120)
    assert job.returncode == 0, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "time limit in 3 minutes" in out and "Traceback" not in out, out[-3000:]
    assert out.count("fdg-rendezvous: stopped by SIGTERM, passed on to this node's workers") == 2, out[-3000:]
    assert "stopped by SIGTERM" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "checkpoints" / sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1]
                       / "manifest.json").read_text())["files"], "no checkpoint to resume"

    requeued = submit()
    ((out, _),) = finish([requeued], 150)
    assert requeued.returncode == 0, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"], "the requeued job finished: it must not requeue again"
    _assert_resumed_bitwise(run_dir, uninterrupted)


# ------------------------------------------------------------- the product's messages (fast, no namespaces)
class _NeverComplete:
    """A rendezvous handler whose rendezvous always times out, as torch's does when a node never joins."""

    def next_rendezvous(self) -> None:
        raise RendezvousTimeoutError


@pytest.mark.parametrize(("before", "missing"), [
    ({}, "nodes 1, 2 of 3"),
    ({"1": 1}, "node 2 of 3"),
    ({"0": 1, "1": 2, "2": 1}, "node 2 of 3"),  # a restart's round: node 2 came to the first round only
])
def test_roll_call_names_the_nodes_that_did_not_join(before: dict[str, int], missing: str) -> None:
    """Node 0's rendezvous of 3 nodes times out; arrivals counted ``before`` it arrived decide who is named."""
    store = rendezvous.serve("127.0.0.1", 0, timedelta(seconds=10))
    for node, count in before.items():
        store.add(f"fdg/arrivals/job/{node}", count)
    params = RendezvousParameters("fdg-c10d", "10.0.0.1:29400", "job", 3, 3, join_timeout="20")
    with pytest.raises(RendezvousTimeoutError) as e:
        rendezvous._RollCall(_NeverComplete(), store, params, node="0").next_rendezvous()
    ranks = missing.split(" of")[0].split(" ", 1)[1]
    assert str(e.value) == (f"the rendezvous at 10.0.0.1:29400 timed out after 20 s: {missing} did not join; start "
                            f"NODE_RANK={ranks} with MASTER=10.0.0.1:29400 and check that it reaches that address "
                            "(RDZV_TIMEOUT sets how long the nodes wait for each other)")


def test_unreachable_store_is_one_line_naming_it() -> None:
    """Nobody listens: the connection is retried for the whole timeout, then one line names address and port."""
    with socket.socket() as bound:  # bound, never listening: every connection is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"^cannot reach 127\.0\.0\.1:{port} within 1\.5 s; nothing listens "
                                                  rf"on 127\.0\.0\.1:{port}"):
            rendezvous.connect("127.0.0.1", port, timedelta(seconds=1.5))
        assert time.monotonic() - started >= 1.5


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_wait_at_the_store_for_all_and_count_those_that_never_came(world: int) -> None:
    """Two ranks reach the workers' store: with a world of 2 both go on; of 3, both stop after the timeout with
    one line saying how many came and where."""
    store = rendezvous.serve("127.0.0.1", 0, timedelta(seconds=10))
    env = {"FDG_MASTER_ADDR": "10.0.0.1", "FDG_MASTER_PORT": "29401"}
    errors: list[Exception] = []

    def arrive(s: object) -> None:
        try:
            rendezvous.await_ranks(s, world, timedelta(seconds=1), env)
        except ConnectionError as e:
            errors.append(e)

    other = threading.Thread(target=arrive, args=(rendezvous.connect("127.0.0.1", store.port, timedelta(seconds=5)),))
    other.start()
    arrive(store)
    other.join()
    if world == 2:
        assert errors == []
        return
    assert [str(e) for e in errors] == ["only 2 of 3 ranks reached the workers' store at 10.0.0.1:29401 (node 0) "
                                        "within 1 s: the others did not start or cannot reach it (a firewall "
                                        "dropping its port, a wrong address)"] * 2
