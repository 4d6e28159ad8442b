"""A dp=2 server whose replicas sit on two emulated hosts; cutting the remote host's link is contained.

Host 0 runs the router and one local replica (`serve --dp 2 --remote-replicas 1`); host 1 runs the other
replica (`serve --join`), which reaches the router over the emulated switch. That split keeps the router's
own replica out of the failure domain being cut, so the test sees both halves of the claim: the cut replica
fails within the detection bound, and the other keeps serving (with both replicas remote, a cut would take
one replica and leave the same picture, at the price of a third model load on this 2-core host).

The HTTP client runs in threads that entered host 0's network namespace (setns is per thread), so the server
is reached on its own loopback. Skipped where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from emulated_hosts import EmulatedHosts, netns_fixture, segments_of  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.usefixtures("netns")]
DETECT_S = 2.0  # the bound from the fault to /health naming the failed replica
PROMPTS = [f"w{5 + i}. w{40 + 3 * i}. w{100 + i}." for i in range(8)]
MAX_TOKENS = 200  # the fixture's context is 256; the streams must still run when the link is cut
LAYERS = 128  # a deeper tiny model: its streams last ~3 s on a quiet host, still running at the cut
HTTP_PORT, LINK_PORT, RDZV_PORT = 8441, 29611, 29621
KEY = "netns-replica-secret-3c9"
CLONE_NEWNET = 0x40000000


def _enter(netns: str) -> None:
    """Move the calling thread into a named network namespace (sockets it opens live there)."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
    finally:
        os.close(fd)


class Client:
    """HTTP to the server on host 0's loopback, from a pool of threads inside host 0's network namespace."""

    def __init__(self, hosts: EmulatedHosts) -> None:
        self.pool = ThreadPoolExecutor(len(PROMPTS) + 4, initializer=_enter, initargs=(hosts.hosts[0].netns,))
        self.url = f"http://127.0.0.1:{HTTP_PORT}"
        self.model = ""

    def call(self, fn, *args):
        """fn(*args) on a thread inside host 0; its result."""
        return self.pool.submit(fn, *args).result()

    def get(self, path: str) -> httpx.Response:
        return self.call(lambda: httpx.get(self.url + path, timeout=2))

    def body(self, prompt: str, **kw) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, **kw}

    def complete(self, prompt: str, **kw) -> httpx.Response:
        return self.call(lambda: httpx.post(self.url + "/v1/completions", json=self.body(prompt, **kw), timeout=120))

    def stream(self, prompt: str, started: threading.Event) -> tuple[str, list[str], bool]:
        """Stream one completion (in the pool); its text, error events and whether [DONE] came."""
        deltas, errors, done = [], [], False
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body(prompt, stream=True),
                              timeout=httpx.Timeout(120, read=90)) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                        break
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            errors.append(event["error"]["message"])
                        else:
                            deltas.append(event["choices"][0]["text"])
                            if len(deltas) >= 8:
                                started.set()
        except Exception as e:  # noqa: BLE001 - the test's assertion reports it
            errors.append(repr(e))
        finally:
            started.set()
        return "".join(deltas), errors, done

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


def _wait(cond, within_s: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + within_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(step)
    return bool(cond())


def _up(client: Client, i: int) -> bool:
    try:
        return client.get(f"/health/{i}").status_code == 200
    except httpx.HTTPError:
        return False


def test_dp2_across_hosts_link_cut_is_contained(checkpoint, tmp_path):
    """dp=2, one replica per emulated host: both serve; cutting host 1's link mid-stream fails its replica on
    /health within 2 s, its streams finish on host 0's replica with the undisturbed greedy text, host 0 keeps
    serving; after the link is back a relaunched replica on host 1 is probed and readmitted; nothing is left."""
    model = checkpoint("llama_gqa", LAYERS)
    env = {"MESHLM_REPLICA_KEY": KEY, "MESHLM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = ["--model", str(model), "--tp", "1", "--kv-cache-mb", "16"]
    log = open(tmp_path / "serve.log", "w+")
    with EmulatedHosts(2) as hosts:
        link = f"{hosts.hosts[0].addr}:{LINK_PORT}"
        server = hosts.popen(0, [sys.executable, "-m", "meshlm.cli", "serve", *common, "--dp", "2",
                                 "--remote-replicas", "1", "--replica-listen", link, "--port", str(HTTP_PORT)],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
        joined: list[subprocess.Popen] = []

        def join() -> None:
            joined.append(hosts.popen(1, [sys.executable, "-m", "meshlm.cli", "serve", "--join", link, *common],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))

        def output() -> str:
            log.flush()
            return (tmp_path / "serve.log").read_text()[-4000:]

        def admitted(i: int) -> bool:
            """Replica i routable; a joiner that exited (cut off, or past its --join-timeout) is relaunched, as a
            launcher would."""
            if joined[-1].poll() is not None:
                join()
            return _up(client, i)

        client = Client(hosts)
        client.model = model.name
        try:
            join()
            assert _wait(lambda: _up(client, 0) and admitted(1), 240), output()
            remote = client.get("/health/1").json()
            assert remote["host"] == hosts.hosts[1].hostname, remote
            pids = set(hosts.pids())

            # Undisturbed reference; then the same prompts streamed, spread over both replicas.
            t0 = time.monotonic()
            want = [client.complete(p).json()["choices"][0]["text"] for p in PROMPTS]
            print(f"\nreference: {len(PROMPTS)} requests one at a time in {time.monotonic() - t0:.1f} s")
            started = [threading.Event() for _ in PROMPTS]
            streams = [client.pool.submit(client.stream, p, e) for p, e in zip(PROMPTS, started)]
            assert all(e.wait(120) for e in started), "streams did not start"
            load = [r["requests"] for r in client.get("/health").json()["replicas"]]
            assert all(n > 0 for n in load), f"requests per replica {load}: both replicas must serve"

            cut_off, exited_at = joined[-1], []
            hosts.cut(1)
            cut_at = time.monotonic()
            threading.Thread(target=lambda: exited_at.append((cut_off.wait(), time.monotonic())), daemon=True).start()
            detected, reason = None, ""
            while detected is None and time.monotonic() - cut_at < 10:
                r = client.get("/health/1")
                if r.status_code == 503:
                    detected, reason = time.monotonic() - cut_at, r.json()["error"]["message"]
                time.sleep(0.02)
            assert detected is not None and detected < DETECT_S, (detected, output())
            assert _up(client, 0) and client.get("/health").status_code == 200
            during = client.complete(PROMPTS[0], max_tokens=8)  # host 0 keeps serving new requests
            assert during.status_code == 200 and want[0].startswith(during.json()["choices"][0]["text"])

            results = [s.result(timeout=180) for s in streams]
            assert [errs for _, errs, _ in results] == [[]] * len(PROMPTS), [errs for _, errs, _ in results]
            assert all(done for _, _, done in results)
            assert [text for text, _, _ in results] == want, "a moved stream repeated, lost or changed a token"
            assert client.metric("meshlm_requests_migrated_total") >= 1, "no stream was on the cut replica"
            assert client.metric("meshlm_requests_lost_total") == 0

            # Host 1's replica, cut off, ends itself (TCP_USER_TIMEOUT); its launcher (here: the test) relaunches it.
            assert _wait(lambda: exited_at, 60), "the cut-off replica did not end itself"
            first_rc, exit_s = exited_at[0][0], exited_at[0][1] - cut_at
            assert first_rc != 0
            hosts.restore(1)
            join()
            readmit_t0 = time.monotonic()
            assert _wait(lambda: admitted(1), 120), output()
            readmit_s = time.monotonic() - readmit_t0
            assert client.complete(PROMPTS[1]).json()["choices"][0]["text"] == want[1]
            print(f"\ndp=2 across hosts, link cut: /health/1 503 after {detected:.2f} s ({reason}); cut replica "
                  f"exited {first_rc} {exit_s:.1f} s after the cut; relaunched, readmitted in {readmit_s:.1f} s")

            pids |= set(hosts.pids())
            server.terminate()  # SIGTERM to the router: it stops its replicas, the remote one included
            assert server.wait(timeout=60) == 0, output()
            assert joined[-1].wait(timeout=30) == 0, "the remote replica should exit 0 when the router stops it"
            left = hosts.wait_empty(20)
            assert not left, f"processes left in the emulated hosts: {left}"
            assert not segments_of(pids), segments_of(pids)
        finally:
            client.pool.shutdown(wait=False, cancel_futures=True)
            log.close()


def test_tp2_replica_spanning_two_hosts_serves(checkpoint, llm, tmp_path):
    """`serve --join` under torchrun, one rank per emulated host (tp=2 over the links), joins a router on host 0
    that has no local replica; its greedy completions equal one process's; SIGTERM to the router ends every
    rank and launcher with nothing left."""
    from meshlm import SamplingParams

    model = checkpoint("llama_gqa")
    want = [o.text for o in llm("llama_gqa").generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=32,
                                                                                  ignore_eos=True))]
    env = {"MESHLM_REPLICA_KEY": KEY, "MESHLM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w+")
    with EmulatedHosts(2) as hosts:
        link = f"{hosts.hosts[0].addr}:{LINK_PORT}"
        server = hosts.popen(0, [sys.executable, "-m", "meshlm.cli", "serve", "--model", str(model), "--tp", "2",
                                 "--remote-replicas", "1", "--replica-listen", link, "--port", str(HTTP_PORT)],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
        nodes: list[subprocess.Popen] = []

        def launch() -> None:
            """One torchrun node per host (a new rendezvous each time: a joiner that gave up, past its
            --join-timeout, is relaunched as its launcher would)."""
            nodes.extend(hosts.torchrun(["serve", "--join", link, "--model", str(model), "--tp", "2",
                                         "--kv-cache-mb", "16"], RDZV_PORT + len(nodes),
                                        f"{hosts.run_id}-{len(nodes)}", env=env, stdout=log, stderr=subprocess.STDOUT))

        def admitted() -> bool:
            if any(n.poll() is not None for n in nodes[-2:]):
                for n in nodes[-2:]:
                    os.killpg(n.pid, signal.SIGKILL)  # the launcher and its rank (popen gave it its own group)
                    n.wait()
                launch()
            return _up(client, 0)

        client = Client(hosts)
        client.model = model.name
        try:
            launch()
            assert _wait(admitted, 240), (tmp_path / "serve.log").read_text()[-4000:]
            got = [client.complete(p, max_tokens=32).json()["choices"][0]["text"] for p in PROMPTS[:4]]
            assert got == want
            server.terminate()
            assert server.wait(timeout=60) == 0
            assert all(n.wait(timeout=60) is not None for n in nodes[-2:])
            assert [n.returncode for n in nodes[-2:]] == [0, 0], (tmp_path / "serve.log").read_text()[-4000:]
            left = hosts.wait_empty(20)
            assert not left, f"processes left in the emulated hosts: {left}"
        finally:
            client.pool.shutdown(wait=False, cancel_futures=True)
            log.close()
