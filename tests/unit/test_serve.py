"""Server pieces without a server: stop-string hold-back, /metrics text, validation, the engine loop."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import pytest

from meshlm.engine.engine import EngineStats
from meshlm.serve.engine_loop import Snapshot
from meshlm.serve.errors import APIError
from meshlm.serve.intake import bearer_token, request_deadline
from meshlm.serve.metrics import ServerMetrics, parse_samples
from meshlm.serve.protocol import FinalStats
from meshlm.serve.streaming import releasable
from meshlm.serve.validation import ModelContext, parse_generation, read_json


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


def test_metrics_text():
    """/metrics: event counters and histograms plus the engine's Snapshot, parsed back by prometheus_client."""
    snap = Snapshot(EngineStats(running=2, waiting=1, max_waiting=8, kv_usage=0.25, num_preemptions=3,
                                prompt_tokens=40, generation_tokens=9,
                                collective_seconds={"tp/all_reduce": 0.5, "pp/send": 0.25}), step_seconds=2.0)
    m = ServerMetrics(lambda: snap)
    other = ServerMetrics(lambda: Snapshot())  # a second server in the same process has its own registry
    m.observe_finish(FinalStats(4, 3, ttft_s=0.05, decode_s=0.2, queue_s=0.001, e2e_s=0.3, num_preemptions=0,
                                num_cached_tokens=0), "length")
    m.observe_finish(None, "abort")
    m.rejected.labels(reason='we"ird').inc(2)
    text = m.render().decode()
    assert "# TYPE meshlm_requests_finished_total counter" in text
    assert "# TYPE meshlm_time_to_first_token_seconds histogram" in text
    assert "# TYPE meshlm_kv_cache_usage_ratio gauge" in text
    assert "# HELP meshlm_num_requests_waiting Engine requests queued for admission." in text
    assert "_created" not in text and 'reason="we\\"ird"' in text
    s = parse_samples(text)
    assert s['meshlm_requests_finished_total{finish_reason="length"}'] == 1
    assert s['meshlm_requests_finished_total{finish_reason="abort"}'] == 1
    assert s['meshlm_requests_rejected_total{reason="we"ird"}'] == 2
    ttft = [s[f'meshlm_time_to_first_token_seconds_bucket{{le="{b}"}}'] for b in ("0.025", "0.05", "0.1", "+Inf")]
    assert ttft == [0, 1, 1, 1] and s["meshlm_time_to_first_token_seconds_count"] == 1
    assert math.isclose(s["meshlm_time_per_output_token_seconds_sum"], 0.1)  # 0.2 s over the 2 tokens after the first
    assert s["meshlm_e2e_request_latency_seconds_count"] == 1  # aborts carry no latency
    assert (s["meshlm_num_requests_running"], s["meshlm_num_requests_waiting"]) == (2, 1)
    assert (s["meshlm_num_preemptions_total"], s["meshlm_prompt_tokens_total"]) == (3, 40)
    assert s['meshlm_collective_seconds_total{group="tp",op="all_reduce"}'] == 0.5
    assert s["meshlm_communication_overhead_ratio"] == 0.375 and s["meshlm_engine_step_seconds_total"] == 2
    assert parse_samples(other.render().decode())["meshlm_e2e_request_latency_seconds_count"] == 0


CTX = ModelContext(frozenset({"m"}), vocab_size=100, max_context=64, capacity_tokens=1024, max_n=4,
                   encode=lambda s: [5 + len(w) for w in s.split()],
                   encode_chat=lambda msgs: [7] * sum(len(m["content"].split()) + 1 for m in msgs))


def test_parse_defaults_and_seeds():
    """max_tokens defaults to the rest of the context (within the server's default cap); n choices get distinct
    seeds derived from the seed."""
    body = {"model": "m", "prompt": "a bb ccc", "n": 3, "seed": 10, "temperature": 0.7}
    req = parse_generation(body, False, CTX)
    assert req.prompts == ((6, 7, 8),) and req.num_choices == 3
    assert [p.seed for p in req.params] == [10, 11, 12]
    assert all(p.max_tokens == 64 - 3 and p.temperature == 0.7 for p in req.params)
    chat = parse_generation({"model": "m", "messages": [{"role": "user", "content": "hi there"}],
                             "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5}, True, CTX)
    assert chat.logprobs == 3 and chat.params[0].max_tokens == 5 and chat.params[0].logprobs == 3
    capped = replace(CTX, default_max_tokens=10)
    assert parse_generation(body, False, capped).params[0].max_tokens == 10
    assert parse_generation({**body, "max_tokens": 50}, False, capped).params[0].max_tokens == 50


def test_parse_accepts():
    """null means unset, unknown fields are ignored, no-op values of refused features pass, text parts join."""
    req = parse_generation({"model": "m", "prompt": [[5, 6], "a bb"], "n": None, "stop": None, "seed": 3,
                            "temperature": 0, "logit_bias": {}, "echo": False, "presence_penalty": 0,
                            "not_a_field": [1], "stream_options": {"include_usage": True, "x": 1}},
                           False, CTX)
    assert req.prompts == ((5, 6), (6, 7)) and req.n == 1 and req.include_usage and req.deadline is None
    assert req.params[0].stop == () and [p.seed for p in req.params] == [3, 4]
    msgs = [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": " b"}]},
            {"role": "assistant", "content": None, "name": "x"}, {"role": "user", "content": "c"}]
    chat = parse_generation({"model": "m", "messages": msgs, "stop": "x", "tools": [], "max_tokens": 9,
                             "response_format": {"type": "text"}, "logprobs": False}, True, CTX)
    assert chat.prompts == ((7,) * 6,) and chat.params[0].stop == ("x",) and chat.logprobs is None


M, CHAT_MSG = {"model": "m", "prompt": "a"}, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body,status,param,fragment", [
    ({**M, "max_tokens": 64}, 400, "max_tokens", "at most 63"),
    ({"model": "zz", "prompt": "a"}, 404, "model", "serves m"),
    ({"prompt": "a"}, 400, "model", "is required"),
    ({"model": 5, "prompt": "a"}, 400, "model", "must be a string"),
    ({"model": "m"}, 400, "prompt", "is required"),
    ({**M, "prompt": 5}, 400, "prompt", "a string, a list of strings, or token ids"),
    ({**M, "prompt": [1, "a"]}, 400, "prompt", "a list of integer token ids"),
    ({**M, "prompt": [[]]}, 400, "prompt", "empty"),
    ({**M, "prompt": [1, 100]}, 400, "prompt", "token id 100"),
    ({**M, "prompt": ["a", "b"], "n": 3}, 400, "n", "the cap is 4"),
    ({**M, "n": 0}, 400, "n", "between 1 and 4, got 0"),
    ({**M, "max_tokens": "8"}, 400, "max_tokens", 'an integer, got "8"'),
    ({**M, "max_tokens": True}, 400, "max_tokens", "an integer, got true"),
    ({**M, "max_tokens": 2.0}, 400, "max_tokens", "an integer"),
    ({**M, "max_tokens": 0}, 400, "max_tokens", ">= 1, got 0"),
    ({**M, "temperature": math.nan}, 400, "temperature", "finite number, got NaN"),
    ({**M, "temperature": "1"}, 400, "temperature", "finite number"),
    ({**M, "temperature": True}, 400, "temperature", "finite number"),
    ({**M, "temperature": 3}, 400, "temperature", "between 0 and 2"),
    ({**M, "top_p": 0}, 400, "top_p", "use 1 to disable"),
    ({**M, "top_k": -2}, 400, "top_k", ">= -1"),
    ({**M, "seed": 2**64}, 400, "seed", "between"),
    ({**M, "seed": "1"}, 400, "seed", "an integer"),
    ({**M, "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    ({**M, "logprobs": True}, 400, "logprobs", "an integer"),
    ({**M, "stop": 5}, 400, "stop", "at most 16 strings"),
    ({**M, "stop": ["a"] * 17}, 400, "stop", "at most 16 strings"),
    ({**M, "stop": ["a", ""]}, 400, "stop", "non-empty"),
    ({**M, "stop_token_ids": [1.5]}, 400, "stop_token_ids", "integer token ids"),
    ({**M, "stop_token_ids": [100]}, 400, "stop_token_ids", "token id 100"),
    ({**M, "ignore_eos": "yes"}, 400, "ignore_eos", "true or false"),
    ({**M, "stream": 1}, 400, "stream", "true or false, got 1"),
    ({**M, "stream_options": 5}, 400, "stream_options", "an object"),
    ({**M, "stream_options": {"include_usage": "no"}}, 400, "include_usage", "true or false"),
    ({**M, "user": 5}, 400, "user", "must be a string"),
    ({**M, "timeout": 5}, 400, "timeout", "X-Request-Timeout header"),
    # OpenAI features meshlm does not implement: refused when set, never silently ignored
    ({**M, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({**M, "frequency_penalty": -1}, 400, "frequency_penalty", "not supported"),
    ({**M, "logit_bias": {"5": 1}}, 400, "logit_bias", "not supported"),
    ({**M, "stop": "x", "best_of": 2}, 400, "best_of", "not supported"),
    ({**M, "echo": True}, 400, "echo", "not supported"),
    ({**M, "suffix": "x"}, 400, "suffix", "not supported"),
    ({**CHAT_MSG, "tools": [{"type": "function"}]}, 400, "tools", "send no tools"),
    ({**CHAT_MSG, "functions": [{"name": "f"}]}, 400, "functions", "send no tools"),
    ({**CHAT_MSG, "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
    ({**CHAT_MSG, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content",
     "text parts"),
    ({**CHAT_MSG, "messages": []}, 400, "messages", "non-empty list"),
    ({**CHAT_MSG, "messages": "hi"}, 400, "messages", "non-empty list"),
    ({**CHAT_MSG, "messages": ["hi"]}, 400, "messages[0]", "role is one of"),
    ({**CHAT_MSG, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]", "role is one of"),
    ({**CHAT_MSG, "messages": [{"role": "user"}]}, 400, "messages[0].content", "must be a string"),
    ({**CHAT_MSG, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "must be a string"),
    ({**CHAT_MSG, "logprobs": 1}, 400, "logprobs", "true or false"),
    ({**CHAT_MSG, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ({**CHAT_MSG, "max_completion_tokens": 70}, 400, "max_completion_tokens", "lower max_completion_tokens"),
])
def test_parse_rejects(body, status, param, fragment):
    """Each bad field is named in an APIError of the right status whose message says what to send."""
    chat = "messages" in body
    with pytest.raises(APIError) as e:
        parse_generation(body, chat, CTX)
    assert (e.value.status, e.value.param) == (status, param)
    assert fragment in e.value.message and "\n" not in e.value.message, e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_read_json():
    """Only JSON objects in UTF-8 with the JSON content type pass."""
    assert read_json(b'{"a": 1}', "application/json; charset=utf-8") == {"a": 1}
    j = "application/json"
    for body, ctype, status in ((b"{}", "text/plain", 415), (b"{}", None, 415), (b"[]", j, 400),
                                (b"\xff", j, 400), (b"{", j, 400)):
        with pytest.raises(APIError) as e:
            read_json(body, ctype)
        assert e.value.status == status


@pytest.mark.parametrize("body,param,fragment", [
    ('{"model": "m", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", None, "levels deep"),
    ('{"model": "m", "x": ' + "[" * 40 + "]" * 40 + "}", None, "more than 32 levels"),
    ('{"model": "m", "prompt": "a \\ud800"}', "prompt", "lone UTF-16 surrogate (\\ud800) at character 2"),
    ('{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content", "\\udfff"),
    ('{"model": "m", "\\ud800": 1}', None, "surrogate"),
])
def test_read_json_refuses_deep_nesting_and_lone_surrogates(body, param, fragment):
    """A body nested too deep or holding a lone surrogate is a 400 naming the problem (and the field)."""
    with pytest.raises(APIError) as e:
        read_json(body.encode(), "application/json")
    assert (e.value.status, e.value.param) == (400, param) and fragment in e.value.message, e.value.message


def test_read_json_keeps_surrogate_pairs_and_shallow_bodies():
    """An escaped surrogate pair is an astral character, not an error; 32 levels pass."""
    assert read_json(b'{"prompt": "\\ud83d\\ude00"}', "application/json")["prompt"] == "\U0001f600"
    assert read_json(('{"x": ' + "[" * 31 + "]" * 31 + "}").encode(), "application/json")


@pytest.mark.parametrize("header,budget,source", [
    (None, 600.0, "--request-timeout"), ("2.5", 2.5, "X-Request-Timeout"), (" 7 ", 7.0, "X-Request-Timeout"),
    ("900", 600.0, "--request-timeout"),
])
def test_request_deadline(header, budget, source):
    """The deadline is fixed at arrival: the header lowers the server's limit, never raises it."""
    d = request_deadline(header, 600.0, arrived=100.0)
    assert (d.at, d.budget_s, d.source) == (100.0 + budget, budget, source)


@pytest.mark.parametrize("header", ["abc", "0", "-1", "nan", "inf", ""])
def test_request_deadline_refuses(header):
    """A bad X-Request-Timeout is a 400 naming the header."""
    with pytest.raises(APIError) as e:
        request_deadline(header, 600.0, 0.0)
    assert (e.value.status, e.value.param) == (400, "X-Request-Timeout") and repr(header) in e.value.message


@pytest.mark.parametrize("value,token", [
    (b"Bearer k", b"k"), (b"bearer k", b"k"), (b"BEARER  k ", b"k"), (b"Basic k", b""), (b"Bearerk", b""),
    (b"k", b""), (None, b""),
])
def test_bearer_token(value, token):
    """The scheme is matched in any case (RFC 7235); anything else yields no token."""
    assert bearer_token([] if value is None else [(b"authorization", value)]) == token


def test_engine_loop_updates_and_abort(llm):
    """The loop thread streams updates to the event loop; an abort frees the KV blocks."""
    from meshlm.config import SamplingParams
    from meshlm.serve.engine_loop import EngineLoop

    model = llm("llama_gqa")  # shared with other tests: its token totals count from here
    before = model.engine.stats()
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
            if loop.snapshot.stats.kv_usage == 0 and loop.snapshot.stats.running == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        stats = loop.snapshot.stats
        assert stats.kv_usage == 0 and stats.running == 0 and stats.waiting == 0
        assert stats.prompt_tokens - before.prompt_tokens == 5  # both prompts, once each
        assert stats.generation_tokens - before.generation_tokens >= 5  # b's tokens before its abort count too
        assert stats.max_waiting == model.engine.ecfg.scheduler.max_waiting and model.engine.failure() is None
    finally:
        loop.stop()
