"""Server pieces without a server: stop-string hold-back, Prometheus text, validation, the engine loop."""

from __future__ import annotations

import asyncio
import math

import pytest

from meshlm.serve.errors import APIError
from meshlm.serve.streaming import releasable
from meshlm.serve.validation import ModelContext, parse_generation, read_json
from meshlm.telemetry.metrics import Registry, parse_text


@pytest.mark.parametrize("text,stops,sendable", [
    ("hello wor", ("world",), "hello "),
    ("hello", ("xyz",), "hello"),
    ("ab", ("abc", "b!"), ""),
    ("abc a", ("abc",), "abc "),  # a complete stop never reaches here: the engine has cut it
    ("", ("x",), ""),
    ("tail w1", ("w1. w2",), "tail "),
])
def test_releasable_holds_back_stop_prefixes(text, stops, sendable):
    """Only text that cannot begin a stop string is sent."""
    assert text[: releasable(text, stops)] == sendable


def test_prometheus_text():
    """Counters, labelled counters, callback gauges and cumulative histograms in the exposition format."""
    r = Registry()
    c = r.counter("x_total", "Things.", ("kind",))
    c.inc(kind="a")
    c.inc(2, kind='we"ird')
    r.gauge("g", "A gauge.", fn=lambda: 0.5)
    h = r.histogram("lat_seconds", "Latency.", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = r.render()
    assert "# TYPE x_total counter" in text and "# TYPE lat_seconds histogram" in text
    assert 'x_total{kind="we\\"ird"} 2' in text
    m = parse_text(text)
    assert m['x_total{kind="a"}'] == 1 and m["g"] == 0.5
    assert [m[f'lat_seconds_bucket{{le="{b}"}}'] for b in ("0.1", "1", "+Inf")] == [1, 2, 3]
    assert m["lat_seconds_count"] == 3 and math.isclose(m["lat_seconds_sum"], 5.55)
    with pytest.raises(ValueError):
        c.inc(-1, kind="a")


CTX = ModelContext(frozenset({"m"}), vocab_size=100, max_context=64, capacity_tokens=1024, max_n=4,
                   encode=lambda s: [5 + len(w) for w in s.split()],
                   encode_chat=lambda msgs: [7] * sum(len(m["content"].split()) + 1 for m in msgs))


def test_parse_defaults_and_seeds():
    """max_tokens defaults to the rest of the context; n choices get distinct seeds derived from the seed."""
    body = {"model": "m", "prompt": "a bb ccc", "n": 3, "seed": 10, "temperature": 0.7}
    req = parse_generation(body, False, CTX)
    assert req.prompts == ((6, 7, 8),) and req.num_choices == 3
    assert [p.seed for p in req.params] == [10, 11, 12]
    assert all(p.max_tokens == 64 - 3 and p.temperature == 0.7 for p in req.params)
    chat = parse_generation({"model": "m", "messages": [{"role": "user", "content": "hi there"}],
                             "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5}, True, CTX)
    assert chat.logprobs == 3 and chat.params[0].max_tokens == 5 and chat.params[0].logprobs == 3


@pytest.mark.parametrize("body,status,param", [
    ({"model": "m", "prompt": "a", "max_tokens": 64}, 400, "max_tokens"),
    ({"model": "zz", "prompt": "a"}, 404, "model"),
    ({"model": "m", "prompt": [1, 100]}, 400, "prompt"),
    ({"model": "m", "prompt": ["a", "b"], "n": 3}, 400, "n"),
    ({"model": "m", "prompt": "a", "temperature": math.nan}, 400, "temperature"),
    ({"model": "m", "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "m", "prompt": "a", "stop": "x", "best_of": 2}, 400, "best_of"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
])
def test_parse_rejects(body, status, param):
    """Each bad field is named in an APIError of the right status."""
    chat = "messages" in body
    with pytest.raises(APIError) as e:
        parse_generation(body, chat, CTX)
    assert e.value.status == status
    if param:
        assert e.value.param == param


def test_read_json():
    """Only JSON objects in UTF-8 with the JSON content type pass."""
    assert read_json(b'{"a": 1}', "application/json; charset=utf-8") == {"a": 1}
    j = "application/json"
    for body, ctype, status in ((b"{}", "text/plain", 415), (b"{}", None, 415), (b"[]", j, 400),
                                (b"\xff", j, 400), (b"{", j, 400)):
        with pytest.raises(APIError) as e:
            read_json(body, ctype)
        assert e.value.status == status


def test_engine_loop_updates_and_abort(llm):
    """The loop thread streams updates to the event loop; an abort frees the KV blocks."""
    from meshlm.config import SamplingParams
    from meshlm.serve.engine_loop import EngineLoop

    model = llm("llama_gqa")
    loop = EngineLoop(model.engine).start()

    async def main() -> None:
        out: asyncio.Queue = asyncio.Queue()
        await loop.submit(["a", "b"], [[5, 6, 7], [8, 9]],
                          [SamplingParams(max_tokens=5, ignore_eos=True), SamplingParams(max_tokens=200,
                                                                                         ignore_eos=True)],
                          out, None)
        tokens, finished = {0: 0, 1: 0}, {}
        while 0 not in finished:
            u = await out.get()
            tokens[u.choice] += len(u.token_ids)
            if u.finish_reason:
                finished[u.choice] = u
        assert tokens[0] == 5 and finished[0].finish_reason == "length" and finished[0].stats.e2e_s > 0
        loop.abort(["b"])
        while 1 not in finished:
            u = await out.get()
            if u.finish_reason:
                finished[u.choice] = u
        assert finished[1].finish_reason == "abort"

    try:
        asyncio.run(main())
        for _ in range(50):
            if loop.snapshot.kv_usage == 0 and loop.snapshot.running == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert loop.snapshot.kv_usage == 0 and loop.snapshot.running == 0
    finally:
        loop.stop()
