"""Emulated hosts on one Linux kernel: network namespaces on a private switch, for multi-host tests.

    with EmulatedHosts(2, rate="100mbit") as hosts:   # namespaces meshlm-<run>-h0, -h1 and -sw
        p = hosts.popen(0, ["python", "-c", "..."])    # runs inside host 0 (address 10.77.0.1)
        hosts.cut(1)                                     # unplug host 1's cable; hosts.restore(1) plugs it back

Topology: a switch namespace (`<run>-sw`) holds a bridge; host i is namespace `<run>-h<i>` with one
interface `eth0` (address 10.77.0.<i+1>/24, loopback up) joined by a veth pair to port `h<i>` of the
bridge. Nothing is created in the caller's namespace, so the machine's own network is never touched.
Each host also gets its own UTS namespace with hostname `meshlm-h<i>`: software that decides "same host"
by hostname (meshlm's shared-memory transport, torchrun's node names) sees distinct hosts. /dev/shm, the
pid namespace and the file system stay shared, as on one kernel they are.

Shaping: `rate` (tc syntax: "100mbit", "1gbit") puts a tbf qdisc on both directions of every host link
(host egress on eth0, host ingress on the switch port). This kernel has no netem, so no latency is added.

Cleanup is unconditional: on exit (also on an exception) every process started here is killed with its
process group, then anything still inside a namespace (`ip netns pids`), then the namespaces go, and
their veth pairs and the bridge with them. Names carry the creating pid; `sweep_stale()` (run on entry)
removes namespaces left by a run whose process is gone (a SIGKILLed pytest).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

PREFIX = "meshlm-"
ETC_NETNS = "/etc/netns"  # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts
SUBNET = "10.77.0"
IFNAME = "eth0"  # the host's interface, the same name in every host (GLOO_SOCKET_IFNAME=eth0)
_RUN = re.compile(rf"^{PREFIX}(\d+)x[0-9a-f]+-(h\d+|sw)$")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here; the message says why (tests skip with it)."""


def unavailable_reason() -> str | None:
    """Why emulated hosts cannot be made on this machine, or None when they can."""
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    name = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}-sw"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL every process whose network namespace is `ns`."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete(ns: str) -> None:
    _kill_inside(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(os.path.join(ETC_NETNS, ns), ignore_errors=True)


def sweep_stale() -> list[str]:
    """Delete the namespaces of runs whose creating process is gone; returns their names."""
    names = set(_netns_names()) | set(os.listdir(ETC_NETNS) if os.path.isdir(ETC_NETNS) else [])
    stale = [ns for ns in names if (m := _RUN.match(ns)) and not _pid_alive(int(m.group(1)))]
    for ns in stale:
        _delete(ns)
    return stale


@dataclass(frozen=True)
class Host:
    """One emulated host: its namespace, address and hostname."""

    index: int
    netns: str
    addr: str  # 10.77.0.<index + 1>
    hostname: str  # meshlm-h<index>
    port: str  # the switch's port for this host (in the switch namespace)


class EmulatedHosts:
    """N emulated hosts on one switch; a context manager that always removes what it made."""

    def __init__(self, n: int, rate: str | None = None, own_hostname: bool = True) -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"n={n}: between 1 and 250 hosts fit in {SUBNET}.0/24")
        self.run_id = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.switch = f"{self.run_id}-sw"
        self.hosts = [Host(i, f"{self.run_id}-h{i}", f"{SUBNET}.{i + 1}", f"meshlm-h{i}", f"h{i}")
                      for i in range(n)]
        self.rate, self.own_hostname = rate, own_hostname
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> EmulatedHosts:
        why = unavailable_reason()
        if why:
            raise NetnsUnavailable(why)
        sweep_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            os.makedirs(os.path.join(ETC_NETNS, h.netns), exist_ok=True)
            with open(os.path.join(ETC_NETNS, h.netns, "hosts"), "w") as f:
                f.write(self._hosts_file(h))
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "add", h.port, "type", "veth", "peer", "name", IFNAME, "netns", h.netns)
            _ip("-n", sw, "link", "set", h.port, "master", "br0")
            _ip("-n", sw, "link", "set", h.port, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", IFNAME)
            _ip("-n", h.netns, "link", "set", IFNAME, "up")
            if self.rate:
                self.shape(h.index, self.rate)

    def _hosts_file(self, me: Host) -> str:
        """/etc/hosts inside `me`: its own name first, as on a real host (torchrun and gloo look it up)."""
        if not self.own_hostname:  # one shared name, which resolves to each host's own address
            return f"127.0.0.1 localhost\n{me.addr} {socket.gethostname()}\n"
        others = [h for h in self.hosts if h is not me]
        return "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.hostname}\n" for h in [me, *others])

    def shape(self, i: int, rate: str | None) -> None:
        """Limit host i's link to `rate` each way with tbf (tc syntax, "100mbit"); None removes the limit."""
        h = self.hosts[i]
        for ns, dev in ((h.netns, IFNAME), (self.switch, h.port)):
            if rate is None:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True)
                continue
            # burst: at least 10 ms of traffic and two 64 KB GSO segments, or tbf drops whole segments
            burst = max(_bits_per_s(rate) // 8 // 100, 128 * 1024)
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                                "rate", rate, "burst", str(burst), "latency", "50ms"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise NetnsUnavailable(f"tc tbf on {ns}/{dev} failed: {r.stderr.strip()}")

    def cut(self, i: int) -> None:
        """Unplug host i: its switch port goes down (host i keeps its address; packets go nowhere)."""
        _ip("-n", self.switch, "link", "set", self.hosts[i].port, "down")

    def restore(self, i: int) -> None:
        """Plug host i back in."""
        _ip("-n", self.switch, "link", "set", self.hosts[i].port, "up")

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside host i (its network and hostname; exec'd, so the pid is argv's)."""
        h = self.hosts[i]
        if not self.own_hostname:
            return ["ip", "netns", "exec", h.netns, *argv]
        return ["ip", "netns", "exec", h.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                h.hostname, *argv]

    def popen(self, i: int, argv: Sequence[str], env: dict[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start argv inside host i in its own process group; killed on exit if still running."""
        env = {**os.environ, **(env or {})}
        env.setdefault("GLOO_SOCKET_IFNAME", IFNAME)  # gloo would otherwise resolve the hostname
        p = subprocess.Popen(self.command(i, argv), env=env, start_new_session=True, **kwargs)
        self.procs.append(p)
        return p

    def run(self, i: int, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run argv inside host i to completion; output captured as text."""
        p = self.popen(i, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def torchrun(self, args: Sequence[str], port: int, run_id: str | None = None, static: bool = False,
                 **kwargs) -> list[subprocess.Popen]:
        """One single-process torchrun node per host running `python -m meshlm.launch *args`, meeting (c10d) at
        host 0's address:port under run_id (default: this run's id); popen(**kwargs) starts each. c10d numbers
        the nodes in the order they join; static=True pins host i to node rank i, so rank 0 runs on host 0,
        beside the rendezvous store (cutting any other host then leaves rank 0's launcher its store)."""
        def rdzv(i: int) -> list[str]:
            if static:
                return ["--node-rank", str(i), "--master-addr", self.hosts[0].addr, "--master-port", str(port)]
            return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.hosts[0].addr}:{port}",
                    "--rdzv-id", run_id or self.run_id]
        return [self.popen(h.index, [
            TORCHRUN, "--nnodes", str(len(self.hosts)), "--nproc-per-node", "1", *rdzv(h.index),
            "--max-restarts", "0", "--local-addr", h.addr, "-m", "meshlm.launch", *args], **kwargs)
            for h in self.hosts]

    def wait_empty(self, within_s: float) -> list[int]:
        """Wait up to within_s for every process inside the hosts to end; the pids still there."""
        deadline = time.monotonic() + within_s
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def pids(self) -> list[int]:
        """Pids of every process inside any host of this run."""
        found = []
        for h in self.hosts:
            r = subprocess.run(["ip", "netns", "pids", h.netns], capture_output=True, text=True)
            found += [int(p) for p in r.stdout.split()]
        return found

    def close(self) -> None:
        """Kill what runs in the hosts (TERM, then KILL after 3 s), delete every namespace (idempotent)."""
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p.pid, signal.SIGKILL)  # the group may outlive its leader
            p.wait()
        for ns in [h.netns for h in self.hosts] + [self.switch]:
            _delete(ns)


def segments_of(pids: set[int]) -> list[str]:
    """meshlm's shared-memory segments in /dev/shm made by any of pids (a run must leave none)."""
    from meshlm.parallel import shm

    def creator(name: str) -> int:
        head = name[len(shm.PREFIX):].split("-", 1)[0]
        return int(head) if head.isdigit() else -1

    return [p for p in os.listdir(shm.SHM_DIR) if p.startswith(shm.PREFIX) and creator(p) in pids]


@pytest.fixture(scope="module", name="netns")
def netns_fixture() -> None:
    """Skip the module, saying why, where network namespaces cannot be made (`usefixtures("netns")`)."""
    why = unavailable_reason()
    if why:
        pytest.skip(f"cannot emulate hosts with network namespaces: {why}")


@pytest.fixture(name="hosts")
def hosts_fixture(request, netns) -> Iterator[EmulatedHosts]:
    """Two emulated hosts (own hostnames unless parametrized indirectly with False), removed after the test."""
    with EmulatedHosts(2, own_hostname=getattr(request, "param", True)) as h:
        yield h


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _bits_per_s(rate: str) -> int:
    """tc's rate syntax ("100mbit", "1gbit", "500kbit") in bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r}: use tc's syntax, e.g. 100mbit or 1gbit")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])
