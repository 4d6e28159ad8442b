"""Clients that go away: their requests are aborted and their KV blocks freed, streaming or not."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_harness import completion

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def wait_idle(server, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and KV usage is zero; the last sample."""
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        idle = (m["meshlm_kv_cache_usage_ratio"] == 0 and m["meshlm_num_requests_running"] == 0
                and m["meshlm_num_requests_waiting"] == 0)
        if idle or time.time() > deadline:
            return m
        time.sleep(0.1)


def aborted(m: dict[str, float]) -> float:
    """Engine requests finished by abort so far."""
    return m.get('meshlm_requests_finished_total{finish_reason="abort"}', 0.0)


async def _cut_streams(server, n: int) -> int:
    """Open n long streams, read until each has sent a token, then drop every connection."""
    body = completion(server.model_name, max_tokens=1500, ignore_eos=True, stream=True)
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60, limits=limits) as c:
        async def one() -> bool:
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"text":"w' in line:
                        return True  # leaving the block closes the connection mid-stream
            return False

        got = await asyncio.gather(*(one() for _ in range(n)))
    return sum(got)


def test_fifty_streams_cut_off(server):
    """50 streams dropped mid-generation: within seconds KV usage is zero and a new request succeeds."""
    m = server.metrics()
    before, gone = aborted(m), m.get('meshlm_client_disconnects_total{stage="stream"}', 0)
    assert asyncio.run(_cut_streams(server, 50)) == 50
    t0 = time.time()
    m = wait_idle(server)
    assert m["meshlm_kv_cache_usage_ratio"] == 0, m
    assert m["meshlm_num_requests_running"] == 0 and m["meshlm_num_requests_waiting"] == 0
    assert time.time() - t0 < 10
    assert aborted(m) - before == 50
    assert m['meshlm_client_disconnects_total{stage="stream"}'] - gone == 50
    with server.client() as c:
        r = c.post("/v1/completions", json=completion(server.model_name, max_tokens=3))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_clients_time_out(server):
    """Non-streaming requests whose clients give up are aborted too; the server keeps serving."""
    before = aborted(server.metrics())
    body = completion(server.model_name, max_tokens=1800, ignore_eos=True)

    async def go() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=0.5) as c:
            async def one() -> None:
                with pytest.raises(httpx.ReadTimeout):
                    await c.post("/v1/completions", json=body)

            await asyncio.gather(*(one() for _ in range(8)))

    asyncio.run(go())
    m = wait_idle(server)
    assert m["meshlm_kv_cache_usage_ratio"] == 0 and m["meshlm_num_requests_running"] == 0, m
    assert aborted(m) - before == 8
    with server.client() as c:
        assert c.post("/v1/completions", json=completion(server.model_name)).status_code == 200


def test_request_timeout(server):
    """A request over its X-Request-Timeout ends with 504 (an error event once streaming), frees its blocks
    and counts as a deadline missed while running."""
    body = completion(server.model_name, max_tokens=1800, ignore_eos=True)
    key = 'meshlm_deadline_exceeded_total{stage="run"}'
    before = server.metrics().get(key, 0)
    with server.client(headers={"X-Request-Timeout": "0.3"}) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert "deadline of 0.3 s (set by X-Request-Timeout) after" in r.json()["error"]["message"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]", events[-2:]
        assert len(events) > 3  # tokens came before the error event
        m = wait_idle(server)
        assert m["meshlm_kv_cache_usage_ratio"] == 0
        assert m['meshlm_requests_finished_total{finish_reason="timeout"}'] >= 2
        assert m[key] - before == 2
        assert c.post("/v1/completions", json=completion(server.model_name)).status_code == 200
