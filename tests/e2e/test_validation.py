"""Strict validation over raw HTTP: each bad request gets its status and the OpenAI error shape, and the
server answers a normal request right after."""

from __future__ import annotations

import json

import pytest
from serve_harness import check_error, completion

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

JSON = {"Content-Type": "application/json"}
CONTEXT = 2048  # the e2e model's max_position_embeddings
C, CHAT = "/v1/completions", "/v1/chat/completions"


def chat(model: str, **kw) -> dict:
    """A small valid chat body."""
    return {"model": model, "messages": [{"role": "user", "content": "w5. w6."}], "max_tokens": 2, **kw}


# (id, route, body builder or raw bytes, extra headers, status, param, message fragments)
CASES = [
    ("context", C, lambda m: completion(m, max_tokens=CONTEXT), {}, 400, "max_tokens", ["2048", "2051"]),
    ("context-chat", CHAT, lambda m: chat(m, max_tokens=CONTEXT), {}, 400, "max_tokens", ["2048"]),
    ("prompt-too-long", C, lambda m: completion(m, prompt=[5] * CONTEXT), {}, 400, "prompt", ["2048"]),
    ("empty-prompt", C, lambda m: completion(m, prompt=""), {}, 400, "prompt", ["empty"]),
    ("empty-ids", C, lambda m: completion(m, prompt=[]), {}, 400, "prompt", ["empty"]),
    ("empty-messages", CHAT, lambda m: chat(m, messages=[]), {}, 400, "messages", []),
    ("no-prompt", C, lambda m: {"model": m}, {}, 400, "prompt", []),
    ("max-tokens-0", C, lambda m: completion(m, max_tokens=0), {}, 400, "max_tokens", []),
    ("max-tokens-neg", C, lambda m: completion(m, max_tokens=-3), {}, 400, "max_tokens", []),
    ("max-tokens-float", C, lambda m: completion(m, max_tokens=2.5), {}, 400, "max_tokens", ["integer"]),
    ("max-tokens-str", C, lambda m: completion(m, max_tokens="8"), {}, 400, "max_tokens", ["integer"]),
    ("max-tokens-bool", C, lambda m: completion(m, max_tokens=True), {}, 400, "max_tokens", []),
    ("temperature-neg", C, lambda m: completion(m, temperature=-0.1), {}, 400, "temperature", []),
    ("temperature-high", C, lambda m: completion(m, temperature=2.01), {}, 400, "temperature", []),
    ("temperature-nan", C, lambda m: json.dumps(completion(m, temperature=float("nan"))).encode(), {}, 400,
     "temperature", []),
    ("top-p-0", C, lambda m: completion(m, top_p=0), {}, 400, "top_p", []),
    ("top-p-high", C, lambda m: completion(m, top_p=1.01), {}, 400, "top_p", []),
    ("top-p-neg", CHAT, lambda m: chat(m, top_p=-0.5), {}, 400, "top_p", []),
    ("n-0", C, lambda m: completion(m, n=0), {}, 400, "n", []),
    ("n-over-cap", C, lambda m: completion(m, n=17), {}, 400, "n", []),
    ("logprobs-21", C, lambda m: completion(m, logprobs=21), {}, 400, "logprobs", []),
    ("top-logprobs-21", CHAT, lambda m: chat(m, logprobs=True, top_logprobs=21), {}, 400, "top_logprobs", []),
    ("stop-empty", C, lambda m: completion(m, stop=["w3.", ""]), {}, 400, "stop", ["non-empty"]),
    ("token-oov", C, lambda m: completion(m, prompt=[5, 512]), {}, 400, "prompt", ["512"]),
    ("token-neg", C, lambda m: completion(m, prompt=[-1, 5]), {}, 400, "prompt", ["-1"]),
    ("unknown-model", C, lambda m: completion("gpt-17"), {}, 404, "model", ["gpt-17"]),
    ("unknown-model-chat", CHAT, lambda m: chat("gpt-17"), {}, 404, "model", []),
    ("malformed-json", C, lambda m: b'{"model": ', {}, 400, None, ["JSON"]),
    ("array-body", C, lambda m: b"[1, 2]", {}, 400, None, ["object"]),
    ("string-body", CHAT, lambda m: b'"hello"', {}, 400, None, ["object"]),
    ("null-body", C, lambda m: b"null", {}, 400, None, []),
    ("empty-body", C, lambda m: b"", {}, 400, None, []),
    ("content-type", C, lambda m: json.dumps(completion(m)).encode(), {"Content-Type": "text/plain"}, 415,
     None, []),
    ("form-type", C, lambda m: b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None, []),
    ("too-large", C, lambda m: json.dumps(completion(m, prompt="w5. " * 300_000)).encode(), {}, 413, None,
     []),
    ("bad-utf8", C, lambda m: b'{"model": "\xff\xfe", "prompt": "w5."}', {}, 400, None, ["UTF-8"]),
    ("bad-message", CHAT, lambda m: chat(m, messages=[{"role": "wizard", "content": "x"}]), {}, 400,
     "messages[0]", []),
    ("nested-100k", C, lambda m: (f'{{"model": "{m}", "prompt": "w5.", "x": ' + "[" * 100_000 + "]" * 100_000
                                  + "}").encode(), {}, 400, None, ["levels deep"]),
    ("lone-surrogate", C, lambda m: f'{{"model": "{m}", "prompt": "w5. \\ud800"}}'.encode(), {}, 400, "prompt",
     ["surrogate", "\\ud800"]),
    ("lone-surrogate-chat", CHAT, lambda m: f'{{"model": "{m}", "messages": [{{"role": "user", "content": '
     '"\\udc00"}]}'.encode(), {}, 400, "messages[0].content", ["surrogate"]),
    ("timeout-header", C, completion, {"X-Request-Timeout": "soon"}, 400, "X-Request-Timeout", ["'soon'"]),
    ("timeout-header-0", C, completion, {"X-Request-Timeout": "0"}, 400, "X-Request-Timeout", ["positive"]),
    ("timeout-body", C, lambda m: completion(m, timeout=5), {}, 400, "timeout", ["X-Request-Timeout"]),
]


@pytest.fixture(scope="module")
def http(server):
    """An httpx client with the API key."""
    with server.client() as c:
        yield c


@pytest.mark.parametrize("name,route,build,headers,status,param,fragments", CASES, ids=[c[0] for c in CASES])
def test_rejected_then_served(http, server, name, route, build, headers, status, param, fragments):
    """The bad request is refused with its status and shape; a good one succeeds right after."""
    body = build(server.model_name)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    err = check_error(http.post(route, content=raw, headers={**JSON, **headers}), status)
    if param is not None:
        assert err["param"] == param, err
    for frag in fragments:
        assert frag in err["message"], err
    ok = http.post(C, json=completion(server.model_name, max_tokens=1))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_boundaries_accepted(http, server):
    """Edge values inside the limits are served: top_p 1.0, temperature 2, logprobs 20, n at the cap."""
    m = server.model_name
    for body in (completion(m, top_p=1.0), completion(m, temperature=2.0, seed=1), completion(m, logprobs=20),
                 completion(m, n=16, max_tokens=1)):
        r = http.post(C, json=body)
        assert r.status_code == 200, r.text
    r = http.post(C, json=completion(m, prompt=[5] * (CONTEXT - 4), max_tokens=4, ignore_eos=True))
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == CONTEXT


def test_chunked_body_over_limit(http, server):
    """A body without Content-Length is cut off at the limit too (413)."""

    def chunks():
        yield b'{"model": "x", "prompt": "'
        for _ in range(40):
            yield b"w5. " * 8192
        yield b'"}'

    check_error(http.post(C, content=chunks(), headers=JSON), 413)
    assert http.post(C, json=completion(server.model_name)).status_code == 200


def test_routes_and_methods(http):
    """Unknown routes are 404 and wrong methods 405, in the same error shape."""
    check_error(http.get("/v1/nothing"), 404)
    check_error(http.get(C), 405)
    check_error(http.get("/v1/models/gpt-17"), 404)
