"""What a new user's odd client does, over real HTTP: every refusal has its status and the OpenAI error shape,
is counted in /metrics, and leaves the server serving. Deadlines: a request queued past its deadline gets
504 (a stream too: its headers wait for the first token)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
from serve_harness import API_KEY, Server, check_error, completion

from meshlm.serve.h11_protocol import MAX_HEADER_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

C = "/v1/completions"


def raw_exchange(srv: Server, head: bytes, body: bytes = b"", pause_s: float = 0.0) -> tuple[int, dict, bytes]:
    """Send a request over a plain socket (optionally in two parts); the status, headers and body read back."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(head)
        if pause_s:
            time.sleep(pause_s)
        s.sendall(body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_out, _, payload = data.partition(b"\r\n\r\n")
    lines = head_out.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, payload


def check_raw_error(status: int, headers: dict, payload: bytes, expected: int, code: str) -> dict:
    """The status, a JSON OpenAI error body with the code, and a closed connection."""
    assert status == expected, payload
    assert headers["content-type"].startswith("application/json") and headers["connection"] == "close"
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


def post_head(srv: Server, length: int) -> bytes:
    """The request line and headers of a JSON POST to /v1/completions with the API key."""
    return (f"POST {C} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def delta(srv: Server, before: dict, key: str) -> float:
    """How much a sample grew since `before`."""
    return srv.metrics().get(key, 0) - before.get(key, 0)


def served(srv: Server) -> bool:
    """A normal request right after succeeds."""
    with srv.client() as c:
        return c.post(C, json=completion(srv.model_name, max_tokens=2)).status_code == 200


def test_bearer_scheme_any_case(server):
    """RFC 7235: 'bearer', 'BEARER' pass with the right key; another scheme or key stays 401."""
    body = completion(server.model_name, max_tokens=1)
    for value, status in ((f"bearer {API_KEY}", 200), (f"BEARER  {API_KEY}", 200), (f"Basic {API_KEY}", 401),
                          ("bearer wrong", 401), (API_KEY, 401)):
        r = httpx.post(server.url + C, json=body, headers={"Authorization": value}, timeout=30)
        assert r.status_code == status, (value, r.text)
        if status == 401:
            assert API_KEY not in r.text and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("pause_s", [0.0, 0.3], ids=["at-once", "in-two-parts"])
def test_oversized_headers_431(server, pause_s):
    """Headers over the limit get a JSON 431 the client can read (not a reset), sent at once or slowly."""
    before = server.metrics()
    big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n"
    head = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n".encode()
    status, headers, payload = raw_exchange(server, head + big[:1000], big[1000:] + b"\r\n", pause_s)
    err = check_raw_error(status, headers, payload, 431, "headers_too_large")
    assert str(MAX_HEADER_BYTES) in err["message"]
    r = httpx.get(server.url + "/v1/models", headers={**server.headers, "X-Big": "b" * MAX_HEADER_BYTES}, timeout=30)
    check_error(r, 431)
    assert delta(server, before, 'meshlm_requests_rejected_total{reason="headers_too_large"}') == 2
    ok = httpx.get(server.url + "/v1/models", headers={**server.headers, "X-Fine": "c" * 8000}, timeout=30)
    assert ok.status_code == 200


def test_malformed_http_400(server):
    """A request line that is not HTTP gets a JSON 400, not uvicorn's plain text."""
    check_raw_error(*raw_exchange(server, b"HELLO THERE\r\n\r\n"), 400, "malformed_http")


def test_disconnect_mid_body(server):
    """A client that leaves mid-upload is a counted disconnect and one log line: no 500, no traceback."""
    before, log_before = server.metrics(), server.output()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(post_head(server, 1000) + b'{"model": "')
        time.sleep(0.3)
    key = 'meshlm_client_disconnects_total{stage="body"}'
    deadline = time.time() + 10
    while delta(server, before, key) < 1 and time.time() < deadline:
        time.sleep(0.1)
    assert delta(server, before, key) == 1
    assert delta(server, before, 'meshlm_http_requests_total{route="/v1/completions",status="499"}') == 1
    assert delta(server, before, 'meshlm_http_requests_total{route="/v1/completions",status="500"}') == 0
    new = server.output()[len(log_before):]
    assert "Traceback" not in new and new.count("disconnected while sending the body") == 1, new
    assert served(server)


def test_slow_upload_408(small_server):
    """A body still incomplete after --body-timeout (1 s here) is answered 408 and the connection closed."""
    before = small_server.metrics()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", small_server.port), timeout=15) as s:
        s.sendall(post_head(small_server, 1000) + b'{"model": "')
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    took = time.perf_counter() - t0
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), data
    err = json.loads(payload)["error"]
    assert err["code"] == "body_timeout" and "--body-timeout" in err["message"]
    assert 0.9 < took < 8, took
    assert delta(small_server, before, 'meshlm_requests_rejected_total{reason="body_timeout"}') == 1
    assert served(small_server)


def test_n_over_queue_cap_is_400(small_server):
    """n above --max-waiting (4 here) can never be admitted: a 400 saying why, not a 429 to retry forever."""
    with small_server.client() as c:
        r = c.post(C, json=completion(small_server.model_name, n=5, max_tokens=1))
        err = check_error(r, 400)
        assert err["param"] == "n" and err["code"] == "exceeds_queue_cap" and "--max-waiting" in err["message"]
        assert "retry-after" not in r.headers
        assert c.post(C, json=completion(small_server.model_name, n=4, max_tokens=1)).status_code == 200


def test_default_max_tokens(small_server):
    """Without max_tokens a request stops at --default-max-tokens (8 here), finish_reason length."""
    body = completion(small_server.model_name, ignore_eos=True)
    del body["max_tokens"]
    with small_server.client() as c:
        r = c.post(C, json=body).json()
    assert r["usage"]["completion_tokens"] == 8 and r["choices"][0]["finish_reason"] == "length"


async def _queued_past_deadline(srv: Server) -> list[httpx.Response]:
    """Fill both seats with long streams, then send three requests that may wait 0.5 s: the answers."""
    long = completion(srv.model_name, max_tokens=2000, ignore_eos=True, stream=True)
    quick = completion(srv.model_name, max_tokens=2)
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60, limits=limits) as c:
        started = asyncio.Event()
        running = [0]

        async def blocker() -> None:
            async with c.stream("POST", C, json=long) as r:
                async for line in r.aiter_lines():
                    if '"text":"w' in line:
                        running[0] += 1
                        if running[0] == 2:
                            started.set()
                        await asyncio.sleep(30)  # hold the seat; cancelled below

        blockers = [asyncio.ensure_future(blocker()) for _ in range(2)]
        await asyncio.wait_for(started.wait(), 60)
        timed = {"X-Request-Timeout": "0.5"}
        answers = await asyncio.gather(c.post(C, json=quick, headers=timed),
                                       c.post(C, json={**quick, "stream": True}, headers=timed),
                                       c.post("/v1/chat/completions", headers=timed, json={
                                           "model": srv.model_name, "max_tokens": 2, "stream": True,
                                           "messages": [{"role": "user", "content": "w5."}]}))
        for b in blockers:
            b.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)
        return answers


def test_deadline_in_queue_504(small_server):
    """Requests that wait in the queue past their deadline get 504 naming it, streamed ones too; counted."""
    before = small_server.metrics()
    t0 = time.perf_counter()
    answers = asyncio.run(_queued_past_deadline(small_server))
    for r in answers:
        err = check_error(r, 504)
        assert err["code"] == "timeout" and err["type"] == "timeout_error"
        assert "deadline of 0.5 s (set by X-Request-Timeout) before its first token" in err["message"]
    assert time.perf_counter() - t0 < 30
    assert delta(small_server, before, 'meshlm_deadline_exceeded_total{stage="queue"}') == 3
    assert served(small_server)


def test_deadline_openai_client(server):
    """The official client sets the header with extra_headers and gets a 504 it can read."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=server.model_name, prompt="w5.", max_tokens=1800, extra_body={
            "ignore_eos": True}, extra_headers={"X-Request-Timeout": "0.2"})
    assert e.value.status_code == 504 and "X-Request-Timeout" in e.value.message
