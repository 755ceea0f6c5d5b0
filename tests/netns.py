"""Two "machines" on this one for the two-node tests: the network namespaces ``tests/two_nodes.sh`` makes
(each with its own network stack, interface ``fdg0`` and address), and ``launch/multinode.sh`` started in each.

The namespaces share this machine's files, so a run directory under ``tmp_path`` is a filesystem both nodes
mount, as on a cluster; each node works in a directory of its own.  Nothing leaves the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "two_nodes.sh"
IFNAME = "fdg0"
ADDRESSES = ("10.231.0.1", "10.231.0.2")  # node 0, node 1 (two_nodes.sh's default SUBNET)
PORT = 29400  # each test has namespaces of its own: a fixed port never collides
MASTER = f"{ADDRESSES[0]}:{PORT}"
_STRIPPED = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "FDG_TEST_KILL")


def make(name: str) -> Nodes:
    """Namespaces ``name-0`` and ``name-1``; skips the test, saying why, where they cannot be made."""
    reason = unavailable()
    if reason:
        pytest.skip(f"two-node tests: {reason}")
    up = subprocess.run([str(SCRIPT), "up", name], capture_output=True, text=True)
    if up.returncode != 0:
        subprocess.run([str(SCRIPT), "down", name], capture_output=True)
        pytest.skip(f"two-node tests: cannot make network namespaces here: {up.stderr.strip()[-300:]}")
    return Nodes(name)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making network namespaces (ip netns) needs root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    return None


def user_env(**extra: str) -> dict[str, str]:
    """A user's environment (none of what other tests in this process set), one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pids: tuple[int, ...]


@dataclass
class Nodes:
    """Namespaces ``name-0`` and ``name-1`` and the processes started in them (all stopped by ``close``)."""

    name: str
    started: list[subprocess.Popen] = field(default_factory=list)

    def ns(self, node: int) -> str:
        return f"{self.name}-{node}"

    def start(self, node: int, cmd: list[str], cwd: Path, env: dict[str, str], **popen: object) -> subprocess.Popen:
        """``cmd`` on ``node``: ``ip netns exec`` execs it, so the returned process is ``cmd`` itself."""
        cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(node), *cmd], cwd=cwd, env=env,
                                start_new_session=True, text=True, **popen)
        self.started.append(proc)
        return proc

    def launch(self, node: int, gpus: int, overrides: list[str], cwd: Path, **env: str) -> subprocess.Popen:
        """``launch/multinode.sh GPUS overrides`` on ``node`` as the README shows it (NNODES=2, its NODE_RANK,
        MASTER = node 0's address, IFNAME = its interface); its stdout and stderr are piped."""
        env = user_env(IFNAME=IFNAME, NNODES="2", NODE_RANK=str(node), MASTER=MASTER, **env)
        return self.start(node, [str(REPO / "launch" / "multinode.sh"), str(gpus), *overrides], cwd, env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def listeners(self, node: int) -> list[Listener]:
        """Every listening TCP socket in ``node``'s namespace (``ss -ltnpH``): there, only the job's."""
        out = subprocess.run(["ip", "netns", "exec", self.ns(node), "ss", "-ltnpH"], capture_output=True, text=True,
                             check=True).stdout
        found = []
        for line in out.splitlines():
            local = line.split()[3]  # 10.231.0.1:29400, [::]:22, *:80
            address, port = local.rsplit(":", 1)
            found.append(Listener(address.strip("[]"), int(port), tuple(int(p) for p in re.findall(r"pid=(\d+)", line))))
        return found

    def block(self, node: int, port: int) -> None:
        """Drop TCP packets that reach ``node`` for ``port`` from the other node (a firewall between the nodes;
        the node's own connections to itself still pass)."""
        rules = (f"table inet fdgtest {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n"
                 f'  iifname "{IFNAME}" tcp dport {port} drop\n }}\n}}\n')
        subprocess.run(["ip", "netns", "exec", self.ns(node), "nft", "-f", "-"], input=rules, text=True, check=True)

    def close(self) -> None:
        """SIGKILL every process left in the namespaces (torchrun's workers have sessions of their own and keep
        the pipes open), then delete them."""
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(SCRIPT), "down", self.name], check=True)
        for proc in self.started:
            proc.communicate()


def needs_nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (apt-get install nftables; .ci/run installs it)")


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process once all ended, within ``timeout`` seconds in all; fails if one did not."""
    deadline = time.monotonic() + timeout
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.args[3:6]} still running after {timeout:.0f} s: it hangs")
    return outs


def parent(pid: int) -> int:
    """The parent process id of ``pid`` (0 if it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def workers(agent: subprocess.Popen) -> list[int]:
    """The worker processes torchrun's agent ``agent`` runs now."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent(int(p.name)) == agent.pid]
