"""Where the processes of a run meet: TCP stores that listen on one address, a store new to every attempt,
and the run directory every rank must share.

Two defaults of torch.distributed (2.14) that this module works around:

- A ``TCPStore`` server listens on every interface (IPv4 and IPv6) whatever host it is given; only a socket
  bound beforehand (``master_listen_fd``) restricts it.  So every store we serve binds its own socket: to
  127.0.0.1 when the run is on one machine, to the configured master address across machines.
- torchrun's agent (c10d rendezvous, TCPStore sharing on: the default) hands its workers one store that
  outlives restarts, while ``init_process_group`` keys it by group and rank only.  A restarted group then
  reads the dead attempt's gloo/NCCL addresses ("connectFullMesh failed ... Connection refused", or a hang).
  So workers never build their process group on the agent's store: ``job_store`` gives them a store that a
  worker of the current attempt serves.

``python -m fdg_dist.rendezvous`` is torchrun with one more rendezvous backend, ``fdg-c10d``: torch's c10d
rendezvous whose store binds to the endpoint's address; the launch scripts and ``fdg-train`` use it.  Across
machines what torch reports as a bare timeout is one line here: a node that never joined is named (a roll
call in the rendezvous store), and a store nobody answers names its address and port.

Must not know about training: stores, addresses and the run directory only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import ipaddress
import os
import signal
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import Store, TCPStore
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.registry import handler_registry
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from fdg_dist.util.files import atomic_write

LOOPBACK = "127.0.0.1"
BACKEND = "fdg-c10d"  # torchrun --rdzv-backend name of the bound c10d rendezvous
RUN_MARKER = ".fdg_run_marker"
SECRET = "FDG_STORE_SECRET"  # the run's secret: what its stores hold is signed with it (SignedStore)
_TOKEN_KEY = "fdg/token"  # in the job store: which attempt serves it
_PUBLISHED_KEY = "fdg/job_store"  # in torchrun's shared store: "address port token" of the job store
_ARRIVED_KEY, _ALL_ARRIVED_KEY = "fdg/arrived", "fdg/all_arrived"  # in the job store: ranks that reached it
# torch's libuv store server never listened on a given socket before pytorch#150215 (torch 2.8)
_LIBUV_TAKES_FD = torch.__version__ >= "2.8"
_SIOCGIFADDR = 0x8915
_IFF_LOOPBACK = 0x8


# ------------------------------------------------------------------ addresses
def address(host: str) -> str:
    """The IP address ``host`` names (IPv4 first): what a store binds to and what its clients dial."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def interface_address(name: str) -> str:
    """IPv4 address of network interface ``name`` (Linux), e.g. for ``GLOO_SOCKET_IFNAME=ib0``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError as e:
            raise OSError(e.errno, f"network interface {name!r} has no IPv4 address ({e.strerror}); "
                                   f"interfaces here: {[n for _, n in socket.if_nameindex()]}") from e
    return socket.inet_ntoa(packed[20:24])


def loopback_interface() -> str:
    """Name of the loopback interface (``lo`` on Linux), for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME."""
    for _, name in socket.if_nameindex():
        flags = Path(f"/sys/class/net/{name}/flags")
        if flags.exists() and int(flags.read_text(), 16) & _IFF_LOOPBACK:
            return name
    return "lo"


# --------------------------------------------------------------------- stores
def serve(host: str, port: int, timeout: timedelta) -> TCPStore:
    """A TCPStore server listening on ``host``'s address only (port 0: any free port; ``.port`` says which)."""
    ip = address(host)
    sock = socket.socket(socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted attempt rebinds a fixed port
    try:
        sock.bind((ip, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {ip}:{port} ({host}): {e.strerror}") from e
    return TCPStore(ip, sock.getsockname()[1], is_master=True, timeout=timeout, wait_for_workers=False,
                    master_listen_fd=sock.detach(), use_libuv=_LIBUV_TAKES_FD)


def connect(host: str, port: int, timeout: timedelta) -> TCPStore:
    reach(address(host), port, timeout)
    return TCPStore(address(host), port, is_master=False, timeout=timeout)


class ForgedValue(RuntimeError):
    """A store value without this run's signature: a process without the run's secret wrote it."""


class SignedStore(Store):
    """A store whose values carry an HMAC-SHA256 of this run's secret, over the store's address, the key and the
    value; reading a value without a valid one raises ``ForgedValue``.

    A TCPStore lets any local process (any process on the network, across machines) read, list and write its
    keys: gloo's and NCCL's addresses, torch's rendezvous state, which the agent unpickles.  Without the secret
    nothing written passes for ours (and a value signed for one store, or key, does not pass in another), so
    forging a peer's address or a rendezvous state fails loudly.  Counters (``add``) cannot be signed: a forged
    one can only stall a barrier until its timeout.  Values stay readable: they are not secrets.
    """

    def __init__(self, inner: TCPStore, secret: bytes) -> None:
        super().__init__()
        self.inner, self._secret = inner, secret
        self._where = f"{inner.host}:{inner.port}".encode()

    def _mac(self, key: str, value: bytes) -> bytes:
        message = b"\0".join((self._where, key.encode(), value))
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest().encode()

    def _sign(self, key: str, value: str | bytes) -> bytes:
        value = value.encode() if isinstance(value, str) else bytes(value)
        return self._mac(key, value) + value

    def _open(self, key: str, wire: bytes) -> bytes:
        mac, value = wire[:64], wire[64:]
        if not hmac.compare_digest(mac, self._mac(key, value)):
            raise ForgedValue(f"store key {key!r} at {self._where.decode()} holds a value this run did not write "
                              f"(no valid signature of its {SECRET}): another process wrote into the run's store")
        return value

    def set(self, key: str, value: str | bytes) -> None:
        self.inner.set(key, self._sign(key, value))

    def get(self, key: str) -> bytes:
        return self._open(key, self.inner.get(key))

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self.inner.multi_set(keys, [self._sign(k, v) for k, v in zip(keys, values, strict=True)])

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self._open(k, v) for k, v in zip(keys, self.inner.multi_get(keys), strict=True)]

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        """As TCPStore's (an empty ``expected``: the key is absent): signatures depend only on key and value,
        so the expected value's stored form is computed again."""
        wire = self._sign(key, expected) if expected else expected
        return self._open(key, self.inner.compare_set(key, wire, self._sign(key, desired)))

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)


def signed(store: TCPStore, env: Mapping[str, str] = os.environ) -> Store:
    """``store`` signing and checking its values with the run's secret (``FDG_STORE_SECRET``: fdg-train and
    the launch scripts set one), or as it is where the run has none."""
    secret = env.get(SECRET)
    return SignedStore(store, secret.encode()) if secret else store


def reach(ip: str, port: int, timeout: timedelta) -> None:
    """Return once ``ip:port`` accepts a TCP connection, or raise ``ConnectionError``: one line naming the port.

    torch's store client retries for its whole timeout, then prints a C++ stack saying "timed out": it does not
    tell a server that is not up yet (refused: waited for, as torch does) from a port a firewall drops or a
    wrong address (no answer).
    """
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            socket.create_connection((ip, port), timeout=max(deadline - time.monotonic(), 0.1)).close()
            return
        except ConnectionRefusedError:
            why = f"nothing listens on {ip}:{port}: is the node that serves it running, with this address?"
        except OSError as e:  # timed out (a SYN dropped), no route
            why = (f"no answer from {ip}:{port} ({e.strerror or 'timed out'}): a firewall drops TCP port {port} "
                   f"on the way to {ip}, or {ip} is not that node's address")
        if time.monotonic() >= deadline:
            raise ConnectionError(f"cannot reach {ip}:{port} within {timeout.total_seconds():g} s; {why}")
        time.sleep(0.2)


# ------------------------------------------------------------------- workers
def single_machine(env: Mapping[str, str] = os.environ) -> bool:
    world = int(env["WORLD_SIZE"])
    return int(env.get("LOCAL_WORLD_SIZE", world)) == world


def pin_transports_to_loopback(env: MutableMapping[str, str] = os.environ) -> None:
    """On one machine gloo and NCCL listen on the loopback interface, unless the user named one."""
    if single_machine(env):
        name = loopback_interface()
        env.setdefault("GLOO_SOCKET_IFNAME", name)
        env.setdefault("NCCL_SOCKET_IFNAME", name)


def job_store(timeout: timedelta, env: Mapping[str, str] = os.environ) -> Store:
    """The store this worker's process groups are built on: served by a worker of this attempt, so it holds
    no key of an earlier attempt, and listening on one address (loopback on one machine).

    - ``FDG_MASTER_ADDR``/``FDG_MASTER_PORT`` (the multi-node launch scripts): that fixed address, served by
      local rank 0 of the node with ``FDG_NODE_RANK=0``.
    - torchrun's shared store (``TORCHELASTIC_USE_AGENT_STORE=True``; it keeps every attempt's keys): rank 0
      serves a store of its own on a free port and publishes "address port token" there; the other ranks
      skip what a dead attempt published (nobody listens, or the store there holds another token).
    - otherwise (``env://`` semantics: our launcher, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): rank 0
      serves ``MASTER_PORT``.
    """
    rank = int(env["RANK"])
    if "FDG_MASTER_ADDR" in env:
        host, port = env["FDG_MASTER_ADDR"], int(env["FDG_MASTER_PORT"])
        if "FDG_NODE_RANK" not in env:
            raise RuntimeError("FDG_MASTER_ADDR is set but FDG_NODE_RANK is not: set it to 0 on the node that serves "
                               "FDG_MASTER_ADDR:FDG_MASTER_PORT and 1, 2, ... on the others (launch/multinode.sh does)")
        serves = env["FDG_NODE_RANK"] == "0" and env.get("LOCAL_RANK", str(rank)) == "0"
        return signed(serve(host, port, timeout) if serves else connect(host, port, timeout), env)
    single = single_machine(env)
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        host, port = LOOPBACK if single else env["MASTER_ADDR"], int(env["MASTER_PORT"])
        return signed(serve(host, port, timeout) if rank == 0 else connect(host, port, timeout), env)
    shared = signed(connect(env["MASTER_ADDR"], int(env["MASTER_PORT"]), timeout), env)
    if rank == 0:
        if single:
            host = LOOPBACK
        elif env.get("GLOO_SOCKET_IFNAME"):  # the network the user chose between machines
            host = interface_address(env["GLOO_SOCKET_IFNAME"].split(",")[0])
        else:  # the agent's address, on rank 0's machine
            host = env["MASTER_ADDR"]
        served = serve(host, 0, timeout)
        store = signed(served, env)
        token = uuid.uuid4().hex
        store.set(_TOKEN_KEY, token)
        shared.set(_PUBLISHED_KEY, f"{address(host)} {served.port} {token}")
        return store
    return _published_store(shared, timeout, env)


def await_ranks(store: Store, world: int, timeout: timedelta, env: Mapping[str, str] = os.environ) -> None:
    """Return once all ``world`` ranks reached the job store; else one line saying how many did and where.

    Without it, the ranks that did reach it wait inside gloo's or NCCL's set-up for the others and fail with
    torch's "wait timeout ... keys: /0//cpu//0/0", which says neither what is missing nor where.
    """
    if store.add(_ARRIVED_KEY, 1) == world:
        store.set(_ALL_ARRIVED_KEY, "1")
    try:
        store.wait([_ALL_ARRIVED_KEY], timeout)
    except dist.DistStoreError:  # the timeout; a lost store server is a DistNetworkError and passes
        where = (f"{env['FDG_MASTER_ADDR']}:{env['FDG_MASTER_PORT']} (node 0)" if "FDG_MASTER_ADDR" in env
                 else "rank 0's process-group store")
        raise ConnectionError(f"only {store.add(_ARRIVED_KEY, 0)} of {world} ranks reached the workers' store at "
                              f"{where} within {timeout.total_seconds():g} s: the others did not start or cannot "
                              "reach it (a firewall dropping its port, a wrong address)") from None


def _published_store(shared: Store, timeout: timedelta, env: Mapping[str, str]) -> Store:
    """The store rank 0 of this attempt published in torchrun's shared store, skipping earlier attempts'.

    Each entry is probed once, with the full timeout (a loaded machine can be slow to accept); an entry
    that fails is an earlier attempt's, and the next one is awaited.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    probed = None
    while True:
        entry = shared.get(_PUBLISHED_KEY).decode()  # blocks until one is published
        if entry != probed:
            probed = entry
            host, port, token = entry.split()
            store = _probe(host, int(port), token, timeout, env)
            if store is not None:
                return store
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 of this attempt published no process-group store within {timeout} "
                               f"(the last one published, {host}:{port}, belongs to an earlier attempt)")
        time.sleep(0.1)


def _probe(host: str, port: int, token: str, timeout: timedelta, env: Mapping[str, str]) -> Store | None:
    """The store at host:port if it is the one carrying ``token``; None if nobody listens or it is another."""
    try:
        socket.create_connection((host, port), timeout=timeout.total_seconds()).close()
        store = signed(connect(host, port, timeout), env)
        if store.check([_TOKEN_KEY]) and store.get(_TOKEN_KEY).decode() == token:
            return store
    except (OSError, RuntimeError):  # refused, reset, or not a TCPStore (torch's DistError is a RuntimeError)
        pass
    return None


def check_shared_run_dir(run_dir: Path, rank: int, group: dist.ProcessGroup | None) -> None:
    """Fail at start, naming the ranks, unless every rank sees the marker rank 0 just wrote in ``run_dir``.

    Ranks on other machines whose run directory is not on a shared filesystem would otherwise each find
    no checkpoint and silently restart from epoch 0.
    """
    path = run_dir / RUN_MARKER
    token: list[str | None] = [uuid.uuid4().hex if rank == 0 else None]
    if rank == 0:
        atomic_write(f"{token[0]}\n".encode(), path)
    dist.broadcast_object_list(token, src=0, group=group)
    try:
        sees = path.read_text().strip() == token[0]
    except OSError:
        sees = False
    seen: list[bool | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, sees, group=group)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise RuntimeError(f"ranks {blind} do not see {path}, which rank 0 just wrote: all ranks must share one "
                           "run directory on a filesystem every node mounts; set hydra.run.dir=<shared path> "
                           "(the same on every node)")


# ------------------------------------------------------------------ launchers
class _BoundC10dBackend(C10dRendezvousBackend):
    """torch's c10d rendezvous state, in a store we bound; named so torch's registry accepts it."""

    @property
    def name(self) -> str:
        return BACKEND


def _bound_c10d_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's c10d rendezvous, its store listening on the endpoint's address only.

    The agent on the endpoint's machine serves it; every other agent (the address is not this machine's, or
    another agent here already serves it) connects, as torch's own heuristic does.
    """
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=29400)
    timeout = timedelta(seconds=params.get_as_int("read_timeout", 60))
    try:
        store = signed(serve(host, port, timeout))
    except OSError as e:
        if e.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE) or port == 0:
            raise
        store = signed(connect(host, port, timeout))
    return _RollCall(create_handler(store, _BoundC10dBackend(store, params.run_id), params), store, params)


class _RollCall(RendezvousHandler):
    """A rendezvous handler that, at every rendezvous, counts this node's arrivals in the store under its
    ``FDG_NODE_RANK`` (the multi-node launch scripts set it), so that a rendezvous that times out says which
    nodes did not come this round instead of torch's bare ``RendezvousTimeoutError``."""

    def __init__(self, handler: RendezvousHandler, store: Store, params: RendezvousParameters,
                 node: str | None = None) -> None:
        self._handler, self._store, self._params = handler, store, params
        self._node = os.environ.get("FDG_NODE_RANK") if node is None else node
        self._prefix = f"fdg/arrivals/{params.run_id}/"

    def next_rendezvous(self) -> RendezvousInfo:
        arrivals = None if self._node is None else self._store.add(self._prefix + self._node, 1)
        try:
            return self._handler.next_rendezvous()
        except RendezvousTimeoutError:
            raise RendezvousTimeoutError(self._absent(arrivals)) from None
        except RendezvousConnectionError as e:
            raise self._lost(e) from e

    def num_nodes_waiting(self) -> int:
        try:
            return self._handler.num_nodes_waiting()
        except RendezvousConnectionError as e:  # asked every few seconds while the workers run
            raise self._lost(e) from e

    def _lost(self, error: RendezvousConnectionError) -> RendezvousConnectionError:
        """torch says "The connection to the C10d store has failed"; say whose store and what it means."""
        return RendezvousConnectionError(f"lost the rendezvous store at {self._params.endpoint}: node 0's launcher "
                                         f"ended (its own line says why) or cannot be reached ({error})")

    def _absent(self, arrivals: int | None) -> str:
        """The timeout in one line: the nodes that have not arrived as often as this one (never, the first time)."""
        p = self._params
        waited = f"the rendezvous at {p.endpoint} timed out after {p.get_as_int('join_timeout', 600)} s"
        if arrivals is None:  # no node ranks to go by
            return f"{waited}: fewer than {p.min_nodes} nodes joined"
        missing = [n for n in range(p.min_nodes) if self._store.add(f"{self._prefix}{n}", 0) < arrivals]
        if not missing:
            return f"{waited}, although nodes 0..{p.min_nodes - 1} all arrived"
        names = ", ".join(map(str, missing))
        return (f"{waited}: node{'s' * (len(missing) > 1)} {names} of {p.min_nodes} did not join; start "
                f"NODE_RANK={names} with MASTER={p.endpoint} and check that it reaches that address (RDZV_TIMEOUT "
                "sets how long the nodes wait for each other)")

    # the rest is torch's handler's
    def get_backend(self) -> str:
        return self._handler.get_backend()

    @property
    def use_agent_store(self) -> bool:
        return self._handler.use_agent_store

    def is_closed(self) -> bool:
        return self._handler.is_closed()

    def set_closed(self) -> None:
        self._handler.set_closed()

    def get_run_id(self) -> str:
        return self._handler.get_run_id()

    def shutdown(self) -> bool:
        return self._handler.shutdown()


def register_backend() -> None:
    """Make ``rdzv_backend="fdg-c10d"`` available to torch's elastic launch in this process.

    Also turns torch's TCPStore sharing off for the agent started here: it would open one more store, on
    every interface (our workers never use it, see ``job_store``).
    """
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    handler_registry.register(BACKEND, _bound_c10d_handler)


@contextmanager
def private_temp_dir(prefix: str) -> Iterator[str]:
    """A folder only this user can open (0700), removed at the end, that is meanwhile this process's default
    temporary folder: torch's launchers put per-worker files in the default one and never remove them
    (``torch.multiprocessing``'s ``pytorch-errorfile-*.pickle``, a failed worker's traceback, world-readable;
    torchrun's ``torchelastic_*`` log folders)."""
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix=prefix) as path:
        tempfile.tempdir = path
        try:
            yield path
        finally:
            tempfile.tempdir = saved


def main() -> None:
    """``python -m fdg_dist.rendezvous [torchrun arguments]``: torchrun, with ``--rdzv-backend=fdg-c10d``, its
    temporary files in a folder of its own removed at exit."""
    from torch.distributed import run

    register_backend()
    with private_temp_dir("fdg-torchrun-"):
        try:
            run.main()
        except (RendezvousError, ConnectionError) as e:  # a node or store that is not there: one line, no traceback
            sys.exit(f"fdg-rendezvous: {(str(e).splitlines() or [type(e).__name__])[0]}")
        except ChildFailedError as e:  # each worker printed its own line; torchrun's table and traceback add nothing
            rank, failure = e.get_first_failure()
            how = (f"was killed by {failure.signal_name()} (no line of its own)" if failure.exitcode < 0 else
                   f"ended with exit code {failure.exitcode} (its line above says why)")
            sys.exit(f"fdg-rendezvous: rank {rank} on this node {how}; train.log in the run directory has every rank's "
                     "traceback")
        except SignalException as e:  # SIGTERM/SIGINT (SLURM's time limit, scancel): passed on to the workers
            print(f"fdg-rendezvous: stopped by {signal.Signals(e.sigval).name}, passed on to this node's workers "
                  "(a worker that checkpointed says so above)", file=sys.stderr)
            sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
