"""Backpressure: a burst beyond the waiting-queue cap gets 429s at once; every accepted request completes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_harness import Server, completion

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BURST, TOKENS = 40, 48


async def _burst(srv: Server) -> list[tuple[int, float, httpx.Response]]:
    body = completion(srv.model_name, max_tokens=TOKENS, ignore_eos=True)
    limits = httpx.Limits(max_connections=BURST + 4)
    async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=120, limits=limits) as c:
        async def one(i: int) -> tuple[int, float, httpx.Response]:
            t0 = time.perf_counter()
            r = await c.post("/v1/completions", json={**body, "stream": i % 2 == 1})
            await r.aread()
            return r.status_code, time.perf_counter() - t0, r

        return await asyncio.gather(*(one(i) for i in range(BURST)))


def test_burst_beyond_queue_cap(small_server):
    """A burst of 40 on 2 seats and 4 waiting places: some 429s (with Retry-After, counted in /metrics); all
    others complete with every token; none lost."""
    before = small_server.metrics()
    results = asyncio.run(_burst(small_server))
    codes = [code for code, _, _ in results]
    ok, rejected = codes.count(200), codes.count(429)
    assert ok + rejected == BURST, codes  # nothing else: no 5xx, nothing lost
    assert rejected > 0 and ok >= 4, codes  # at least the 4 waiting places
    for code, seconds, r in results:
        if code == 429:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            assert seconds < 5, "a 429 must come at once, not after queueing"
        elif r.headers["content-type"].startswith("application/json"):
            assert r.json()["usage"]["completion_tokens"] == TOKENS
        else:
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
    after = small_server.metrics()
    key = 'meshlm_requests_rejected_total{reason="queue_full"}'
    assert after.get(key, 0) - before.get(key, 0) == rejected
    done = 'meshlm_requests_finished_total{finish_reason="length"}'
    assert after[done] - before.get(done, 0) == ok
    assert after["meshlm_generation_tokens_total"] - before["meshlm_generation_tokens_total"] == ok * TOKENS
    # Recovery: the queue drained, a new request is served at once.
    with small_server.client() as c:
        r = c.post("/v1/completions", json=completion(small_server.model_name, max_tokens=2))
        assert r.status_code == 200
