"""Shutdown and failure while serving: SIGTERM drains and exits 0; a killed rank fails fast and loudly."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from serve_harness import Server, completion

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


class Stream(threading.Thread):
    """A streaming request read in the background: events, the status, and whatever error ended it."""

    def __init__(self, srv: Server, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.srv, self.max_tokens = srv, max_tokens
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        body = completion(self.srv.model_name, max_tokens=self.max_tokens, ignore_eos=True, stream=True)
        try:
            with httpx.stream("POST", self.srv.url + "/v1/completions", json=body, headers=self.srv.headers,
                              timeout=httpx.Timeout(60, read=30)) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        if '"text":"w' in line:
                            self.started.set()
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.started.set()


def post(srv: Server, **kw) -> httpx.Response:
    """A completion request."""
    return httpx.post(srv.url + "/v1/completions", json=completion(srv.model_name, **kw), headers=srv.headers,
                      timeout=30)


def test_sigterm_drains_then_exits_zero(long_model):
    """SIGTERM: new requests and /health get 503; a short stream finishes, one past --drain-timeout is aborted
    with an error event; exit 0; no leftovers. First the server idles past --comm-timeout (keep-alive)."""
    srv = Server(long_model, "--drain-timeout", "4", "--comm-timeout", "5").wait_healthy()
    try:
        time.sleep(7)
        assert post(srv).status_code == 200, srv.output()
        long, short = Stream(srv, max_tokens=15000), Stream(srv, max_tokens=40)
        assert long.started.wait(60) and short.started.wait(60) and long.status == 200
        t0 = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = post(srv)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        short.join(60)
        assert short.error is None and short.events[-1] == "[DONE]", short.error
        assert '"finish_reason":"length"' in short.events[-2], "the short stream should finish whole"
        long.join(60)
        assert long.error is None and long.events[-1] == "[DONE]" and '"code":"aborted"' in long.events[-2]
        assert srv.proc.wait(60) == 0, srv.output()
        assert 4 <= time.time() - t0 < 30
        assert not srv.leftovers(), "rank processes outlived the server"
    finally:
        srv.stop(10)


def test_rank_killed_while_serving(long_model):
    """--exit-on-failure, kill -9 of rank 1: /health 503 in seconds, in-flight requests get errors, exit
    non-zero, no orphans."""
    srv = Server(long_model, "--exit-on-failure").wait_healthy()
    try:
        streams = [Stream(srv, max_tokens=15000) for _ in range(3)]
        results: list[httpx.Response | BaseException] = []

        def blocking() -> None:
            try:
                results.append(post(srv, max_tokens=15000, ignore_eos=True))
            except httpx.HTTPError as e:
                results.append(e)

        waiter = threading.Thread(target=blocking, daemon=True)
        waiter.start()
        assert all(s.started.wait(60) for s in streams)
        ranks = srv.rank_pids()
        assert len(ranks) == 2, ranks
        t0 = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        unhealthy = None
        while time.time() - t0 < 10 and unhealthy is None:
            try:
                if httpx.get(srv.url + "/health", timeout=2).status_code == 503:
                    unhealthy = time.time() - t0
            except httpx.HTTPError:
                unhealthy = time.time() - t0  # already gone: also not healthy
            time.sleep(0.05)
        assert unhealthy is not None and unhealthy < 5, f"/health still 200 after {time.time() - t0:.1f}s"
        for s in streams:
            s.join(30)
            assert not s.is_alive(), "a stream hung after the rank died"
            assert s.error is not None or any('"error"' in e for e in s.events), s.events[-3:]
        waiter.join(30)
        assert results and (isinstance(results[0], BaseException) or results[0].status_code >= 500), results
        code = srv.proc.wait(30)
        assert code != 0, srv.output()
        assert time.time() - t0 < 30
        assert "rank 1" in srv.output()
        assert not srv.leftovers(), "a process outlived the server"
    finally:
        srv.stop(10)
