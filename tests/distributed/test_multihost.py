"""Multi-host runs on emulated hosts: each rank in its own network namespace, torchrun across a switch.

Two hosts (tests/emulated_hosts.py), one torchrun node each, c10d rendezvous on host 0's address. The
reference is one process on one host. Skipped where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace

import emulated_hosts
import pytest
from emulated_hosts import EmulatedHosts, hosts_fixture, netns_fixture, segments_of  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.usefixtures("netns")]
PROMPT = "w5. w6. w7."
RDZV_PORT = 29511


@pytest.fixture(scope="module")
def one_host(checkpoint) -> str:
    """Greedy text of one process on one host: the reference every layout must print."""
    r = subprocess.run([sys.executable, "-m", "meshlm.cli", *generate_args(checkpoint, 16)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def generate_args(checkpoint, max_tokens: int) -> list[str]:
    """`meshlm generate` arguments on the tiny GQA fixture."""
    return ["generate", PROMPT, "--model", str(checkpoint("llama_gqa")), "--max-tokens", str(max_tokens),
            "--ignore-eos"]


def torchrun_nodes(hosts: EmulatedHosts, args: list[str], static: bool = False) -> list[subprocess.Popen]:
    """Start every host's torchrun node, output piped as text (static: rank 0 on host 0)."""
    return hosts.torchrun(args, RDZV_PORT, static=static, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.mark.parametrize(("layout", "hosts", "transport"), [
    (["--tp", "2"], True, "gloo"),  # own hostnames: two hosts, so the tp group talks over the links
    (["--tp", "2"], False, "shm"),  # one hostname: one host to meshlm; /dev/shm is shared, so shm is correct
    (["--pp", "2"], True, None),
], indirect=["hosts"], ids=["tp2", "tp2-same-hostname", "pp2"])
def test_two_hosts_match_one_host(hosts, checkpoint, one_host, layout, transport):
    """tp=2 or pp=2 with one rank per emulated host prints the same greedy text as one process."""
    nodes = torchrun_nodes(hosts, generate_args(checkpoint, 16) + layout)
    results = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [err[-3000:] for _, err in results]
    printed = [(out, err) for out, err in results if out.strip()]
    assert len(printed) == 1, "exactly one host runs rank 0 and prints"
    out, err = printed[0]
    assert out == one_host
    if transport:
        assert re.findall(r"collectives \d+ ms over (\w+)", err) == [transport, transport], err


def test_link_cut_fails_the_run_within_the_comm_timeout(hosts, checkpoint):
    """Unplugging the host of rank 1 mid-generation: rank 0 names the rank and host it lost within the
    collective timeout, every rank and launcher exits (the far launcher once the link is back), no segment
    stays in /dev/shm."""
    timeout_s = 5.0
    # Rank 0 on host 0, beside torchrun's rendezvous store: cut from a store on the far host, rank 0's launcher
    # would wait out torchrun's own store timeouts after meshlm had exited (a flaky failure when c10d numbered
    # host 1 first).
    nodes = torchrun_nodes(hosts, generate_args(checkpoint, 240) + ["--tp", "2", "--comm-timeout", str(timeout_s)],
                           static=True)
    first_out: list[tuple[int, float]] = []  # (host, time) of the first generated text
    errors = _timestamped_stderr(nodes)

    def watch_out(i: int) -> None:
        text = nodes[i].stdout.read(len(PROMPT) + 20)  # the prompt, then a few generated tokens
        if len(text) > len(PROMPT):
            first_out.append((i, time.monotonic()))
        nodes[i].stdout.read()

    for i in (0, 1):
        threading.Thread(target=watch_out, args=(i,), daemon=True).start()
    deadline = time.monotonic() + 180
    while not first_out and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
        time.sleep(0.02)
    assert first_out, [e[-5:] for e in errors]
    rank0_host = first_out[0][0]
    assert rank0_host == 0, "static rendezvous puts rank 0 on host 0"
    far = 1 - rank0_host
    pids = set(hosts.pids())
    hosts.cut(far)
    cut_at = time.monotonic()
    nodes[rank0_host].wait(timeout=timeout_s + 60)
    ended_s = time.monotonic() - cut_at
    assert nodes[rank0_host].returncode != 0
    said = [(t, line) for t, line in errors[rank0_host] if "meshlm: error" in line]
    assert said, "".join(line for _, line in errors[rank0_host])[-3000:]
    detected_s = said[0][0] - cut_at
    message = said[0][1]
    far_host = hosts.hosts[far]
    assert "rank 1" in message and far_host.hostname in message, message
    assert timeout_s - 0.5 < detected_s < timeout_s + 10, detected_s
    print(f"\nlink cut: rank 0 reported it after {detected_s:.1f} s (comm timeout {timeout_s:.0f} s), "
          f"its launcher exited after {ended_s:.1f} s: {message.strip()}")
    hosts.restore(far)  # torchrun's agent on the far host waits on the rendezvous store until it can reach it
    nodes[far].wait(timeout=90)
    assert nodes[far].returncode != 0
    far_said = "".join(line for _, line in errors[far])
    # The far rank names rank 0 when the cut finds it inside a collective (its own comm timeout); when the cut
    # finds it waiting for rank 0's next call, its torchrun agent ends it on reconnecting to a store that is gone.
    named = f"rank 0 on {hosts.hosts[rank0_host].hostname}" in far_said
    assert named or "RendezvousConnectionError" in far_said, far_said[-3000:]
    left = hosts.wait_empty(20)
    assert not left, f"processes left in the emulated hosts: {left}"
    assert not segments_of(pids), segments_of(pids)


def test_cleanup_after_a_failure_and_of_stale_runs():
    """An exception inside the hosts kills what runs there and removes every namespace; a run whose creator
    died (its namespaces and a process inside them left behind) is swept by the next one."""
    with pytest.raises(RuntimeError, match="a failing test"), EmulatedHosts(2) as hosts:
        inside = hosts.popen(1, ["sleep", "300"])
        raise RuntimeError("a failing test")
    assert inside.poll() is not None
    assert not [ns for ns in emulated_hosts._netns_names() if ns.startswith(hosts.run_id)]
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = EmulatedHosts(1)
    orphan.run_id = f"{emulated_hosts.PREFIX}{dead.pid}x0bad"  # as if made by a process that is gone
    orphan.switch, orphan.hosts = f"{orphan.run_id}-sw", [replace(orphan.hosts[0], netns=f"{orphan.run_id}-h0")]
    orphan._build()
    stray = subprocess.Popen(orphan.command(0, ["sleep", "300"]), start_new_session=True)
    with EmulatedHosts(1):
        assert stray.wait(timeout=10) != 0
        assert not [ns for ns in emulated_hosts._netns_names() if ns.startswith(orphan.run_id)]
        assert not os.path.exists(os.path.join(emulated_hosts.ETC_NETNS, f"{orphan.run_id}-h0"))


SINK = """import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 5001)); s.listen()
for _ in range(2):
    c, n = s.accept()[0], 0
    b = c.recv(1 << 20); t0 = time.monotonic()
    while b:
        n += len(b); b = c.recv(1 << 20)
    print(n, time.monotonic() - t0, flush=True)
"""
SOURCE = """import socket, time
for _ in range(50):
    try:
        s = socket.create_connection(("%s", 5001), timeout=2); break
    except OSError:
        time.sleep(0.1)
s.sendall(bytes(4 << 20)); s.close()
"""


def test_shaped_link_limits_throughput(hosts):
    """tbf on host 1's link holds 4 MiB to about its rate; removing the shaping lifts the limit."""
    sink = hosts.popen(1, [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    seconds = []
    for rate in ("40mbit", None):
        hosts.shape(1, rate)
        assert hosts.run(0, [sys.executable, "-c", SOURCE % hosts.hosts[1].addr]).returncode == 0
        n, s = sink.stdout.readline().split()
        assert int(n) == 4 << 20
        seconds.append(float(s))
    expected = (4 << 20) * 8 / 40e6  # 0.84 s
    assert seconds[0] > 0.7 * expected and seconds[1] < seconds[0] / 3, seconds


HEALTH = """import json, sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen("http://127.0.0.1:%d/health", timeout=2)
    print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, e)
"""


def _health(hosts: EmulatedHosts, i: int, port: int) -> tuple[int, str]:
    out = hosts.run(i, [sys.executable, "-c", HEALTH % port], timeout=10).stdout.strip()
    code, _, body = out.partition(" ")
    return int(code or 0), body


def test_idle_server_notices_a_link_cut(hosts, checkpoint):
    """`meshlm serve --tp 2` across two hosts, idle: after the far host's link is cut, the rank keep-alive
    fails within keep-alive + comm timeout, /health stops answering 200, the server exits with an error
    naming the lost rank and host, and once the link is back nothing is left."""
    timeout_s, port = 4.0, 8431
    nodes = hosts.torchrun(["serve", "--model", str(checkpoint("llama_gqa")), "--tp", "2", "--comm-timeout",
                            str(timeout_s), "--port", str(port)], RDZV_PORT, static=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors = _timestamped_stderr(nodes)
    deadline, rank0_host = time.monotonic() + 180, None
    while rank0_host is None and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
        rank0_host = next((i for i in (0, 1) if _health(hosts, i, port)[0] == 200), None)
        time.sleep(0.5)
    assert rank0_host is not None, [n.poll() for n in nodes]
    far = 1 - rank0_host
    hosts.cut(far)
    cut_at = time.monotonic()
    while (health := _health(hosts, rank0_host, port))[0] == 200 and time.monotonic() - cut_at < 60:
        time.sleep(0.2)
    assert health[0] != 200
    nodes[rank0_host].wait(timeout=60)
    assert nodes[rank0_host].returncode != 0
    said = [(t, line) for t, line in errors[rank0_host] if "meshlm: error" in line]
    assert said, "".join(line for _, line in errors[rank0_host])[-3000:]
    detected_s, message = said[0][0] - cut_at, said[0][1]
    assert "rank 1" in message and hosts.hosts[far].hostname in message, message
    keepalive_s = max(0.5, min(10.0, timeout_s / 4))  # serve/server.py's ping period
    assert detected_s < keepalive_s + timeout_s + 5, detected_s
    print(f"\nidle server, link cut: error after {detected_s:.1f} s (keep-alive {keepalive_s:g} s + comm "
          f"timeout {timeout_s:g} s), /health answered {health}: {message.strip()}")
    hosts.restore(far)  # the far rank waits for its next call, and its launcher on the rendezvous store
    nodes[far].wait(timeout=90)
    left = hosts.wait_empty(20)
    assert not left, f"processes left in the emulated hosts: {left}"


def _timestamped_stderr(nodes: list[subprocess.Popen]) -> list[list[tuple[float, str]]]:
    """Each node's stderr lines with the time they arrived, filled by reader threads."""
    lines: list[list[tuple[float, str]]] = [[] for _ in nodes]

    def read(i: int) -> None:
        for line in nodes[i].stderr:
            lines[i].append((time.monotonic(), line))

    for i in range(len(nodes)):
        threading.Thread(target=read, args=(i,), daemon=True).start()
    return lines
