"""The official `openai` client against `meshlm serve` at tp=2: completions and chat, streamed or not."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_harness import API_KEY

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROMPT = "w5. w6. w7. w8."
GO = {"ignore_eos": True}  # extension field: exact lengths from a random model


@pytest.fixture(scope="module")
def client(server):
    """An OpenAI client pointed at the server."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models(client, server):
    """GET /v1/models lists the served model."""
    ids = [m.id for m in client.models.list().data]
    assert ids == [server.model_name]


def test_completion(client, server):
    """Greedy completion: text, finish reason, usage; the same request twice gives the same text."""
    a = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body=GO)
    b = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body=GO)
    assert a.object == "text_completion" and a.choices[0].finish_reason == "length"
    assert a.usage.prompt_tokens == 4 and a.usage.completion_tokens == 8 and a.usage.total_tokens == 12
    assert a.choices[0].text == b.choices[0].text


def test_completion_stream_matches(client, server):
    """Streamed chunks concatenate to the non-streamed text; usage arrives in the final chunk."""
    whole = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body=GO).choices[0].text
    chunks = list(client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=GO))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat(client, server):
    """Chat, not streamed: an assistant message."""
    r = client.chat.completions.create(model=server.model_name, max_tokens=6, temperature=0, extra_body=GO,
                                       messages=[{"role": "user", "content": "w9. w10."}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 6


def test_chat_stream(client, server):
    """Chat, streamed: a role delta first, then content equal to the non-streamed message."""
    msgs = [{"role": "system", "content": "w3."}, {"role": "user", "content": "w9. w10."}]
    whole = client.chat.completions.create(model=server.model_name, max_tokens=10, temperature=0,
                                           messages=msgs, extra_body=GO).choices[0].message.content
    chunks = list(client.chat.completions.create(model=server.model_name, max_tokens=10, temperature=0,
                                                 messages=msgs, stream=True, extra_body=GO))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_seed_logprobs(client, server):
    """n=3 sampled choices with a seed: reproducible, distinct seeds per choice, logprobs with top 5."""
    kw = dict(model=server.model_name, prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=7, logprobs=5,
              extra_body=GO)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.top_logprobs[0]) == 5 and all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(model=server.model_name, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=20, messages=[{"role": "user", "content": "w4."}])
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 20


def test_stop_string_spanning_tokens_never_leaks(client, server):
    """A stop string made of two tokens ends the text before it, streamed or not."""
    base = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body=GO).choices[0].text
    words = base.split()
    stop = f"{words[3][1:]} {words[4][:2]}"  # tail of the 4th token + head of the 5th
    want = base[: base.index(stop)]
    r = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                  stop=[stop], extra_body=GO)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    seen = ""
    for c in client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                       stop=stop, stream=True, extra_body=GO):
        seen += c.choices[0].text
        assert want.startswith(seen), f"sent {seen!r}, beyond the final text {want!r}"
    assert seen == want


def test_auth(server):
    """Every route but /health needs the key; a wrong key is a 401 in the OpenAI shape."""
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/metrics", "/v1/models", "/nope"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health").status_code == 200
    cors = httpx.get(server.url + "/v1/models", headers={**server.headers, "Origin": "http://evil.example"})
    assert cors.status_code == 200 and "access-control-allow-origin" not in cors.headers  # CORS off
    assert API_KEY not in server.output()  # the key is never printed or logged


def test_metrics(server):
    """/metrics is Prometheus text with the latency histograms, gauges and counters."""
    m = server.metrics()
    for name in ("meshlm_time_to_first_token_seconds_count", "meshlm_time_per_output_token_seconds_count",
                 "meshlm_e2e_request_latency_seconds_count", "meshlm_request_queue_time_seconds_count",
                 "meshlm_num_requests_running", "meshlm_num_requests_waiting", "meshlm_kv_cache_usage_ratio",
                 "meshlm_num_preemptions_total", "meshlm_prompt_tokens_total",
                 "meshlm_generation_tokens_total",
                 "meshlm_communication_overhead_ratio", "meshlm_pipeline_bubble_fraction"):
        assert name in m, name
    assert m["meshlm_time_to_first_token_seconds_count"] > 0
    assert m['meshlm_time_to_first_token_seconds_bucket{le="+Inf"}'] == m[
        "meshlm_time_to_first_token_seconds_count"]
    assert m['meshlm_collective_seconds_total{group="tp",op="all_reduce"}'] > 0
    assert 0 < m["meshlm_communication_overhead_ratio"] < 1
    assert m['meshlm_requests_rejected_total{reason="auth"}'] >= 1
