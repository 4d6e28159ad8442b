"""`meshlm serve --pp 2` with the official `openai` client: the engine drives two pipeline stages."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_harness import API_KEY, Server

from meshlm import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROMPTS = ["w5. w6. w7. w8.", "w40. w41.", "w9. w10. w11. w12. w13. w14. w15.", "w300.", "w7. w7. w7."]
GO = {"ignore_eos": True}
TRACE_STEPS = 6


@pytest.fixture(scope="module")
def pp_server(serve_model, tmp_path_factory):
    """A server over two pipeline stages (one layer each); stopped with SIGTERM at the end."""
    logs = tmp_path_factory.mktemp("serve-pp")
    srv = Server(serve_model, "--pp", "2", "--kv-cache-mb", "32", "--trace", str(logs / "trace.json"),
                 "--trace-steps", str(TRACE_STEPS), tp=1, log_dir=logs).wait_healthy()
    srv.trace = logs / "trace.json"
    yield srv
    code = srv.stop()
    assert code == 0, srv.output()
    assert not srv.leftovers(), "rank processes outlived the server"


@pytest.fixture(scope="module")
def expected(serve_model):
    """Greedy texts of PROMPTS on one process (no pipeline)."""
    with LLM(str(serve_model), progress=False) as one:
        return [o.text for o in one.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))]


def test_pp2_completions_equal_one_device(pp_server, expected):
    """Concurrent greedy completions (several steps in flight) and a streamed one equal one device."""
    client = openai.OpenAI(base_url=pp_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def complete(prompt: str) -> str:
        return client.completions.create(model=pp_server.model_name, prompt=prompt, max_tokens=10,
                                         temperature=0, extra_body=GO).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(complete, PROMPTS)) == expected
    chunks = client.completions.create(model=pp_server.model_name, prompt=PROMPTS[0], max_tokens=10,
                                       temperature=0, stream=True, extra_body=GO)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[0]


def test_pp2_chat_and_models(pp_server):
    """Chat answers and /v1/models lists the model; the server stays healthy after requests."""
    client = openai.OpenAI(base_url=pp_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [pp_server.model_name]
    r = client.chat.completions.create(model=pp_server.model_name, max_tokens=6, temperature=0, extra_body=GO,
                                       messages=[{"role": "user", "content": "w9. w10."}])
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 6
    with pp_server.client() as http:
        assert http.get("/health").status_code == 200


def test_pp2_bubble_fraction_metric(pp_server):
    """/metrics reports stage 0's bubble: it waited for stage 1 at some point, but not all the time."""
    client = openai.OpenAI(base_url=pp_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    bubble = 0.0
    for _ in range(5):  # the gauge is refreshed at most twice a second, during steps
        client.completions.create(model=pp_server.model_name, prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                  extra_body=GO)
        with pp_server.client() as http:
            metrics = http.get("/metrics").text
        bubble = next(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("meshlm_pipeline_bubble_fraction"))
        if bubble > 0:
            break
    assert 0.0 < bubble < 1.0


def test_pp2_trace_window(pp_server):
    """--trace --trace-steps N: after N engine steps the server writes every rank's spans of those steps."""
    client = openai.OpenAI(base_url=pp_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    client.completions.create(model=pp_server.model_name, prompt=PROMPTS[0], max_tokens=TRACE_STEPS + 2,
                              temperature=0, extra_body=GO)
    events = json.loads(pp_server.trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    assert {"compute", "send", "recv", "idle"} <= {e["name"] for e in spans}
    steps = {e["args"]["step"] for e in spans if e["pid"] == 1 and e["name"] == "compute"}
    assert TRACE_STEPS <= len(steps) <= TRACE_STEPS + 1  # the window (and a step in flight as it closed)
