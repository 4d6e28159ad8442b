"""`meshlm serve --pp 2 --speculative ngram` with the official `openai` client: exact greedy text, streamed and
not, stop strings inside a step's several tokens, and the spec-decode metrics."""

from __future__ import annotations

import openai
import pytest
from serve_harness import API_KEY, Server

from meshlm import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROMPTS = ["w5. w6. w7. w5. w6. w7. w5. w6.", "w40. w41. w40. w41. w40.", "w9. w10. w11. w9. w10."]
GO = {"ignore_eos": True}


@pytest.fixture(scope="module")
def spec_server(serve_model, tmp_path_factory):
    """Two pipeline stages, n-gram speculation on every step; stopped with SIGTERM at the end."""
    srv = Server(serve_model, "--pp", "2", "--kv-cache-mb", "32", "--speculative", "ngram",
                 "--speculative-policy", "always", tp=1, log_dir=tmp_path_factory.mktemp("serve-spec")).wait_healthy()
    yield srv
    assert srv.stop() == 0, srv.output()
    assert not srv.leftovers(), "rank processes outlived the server"


@pytest.fixture(scope="module")
def expected(serve_model):
    """Greedy texts of PROMPTS on one process without speculation."""
    with LLM(str(serve_model), progress=False) as one:
        return [o.text for o in one.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))]


def test_speculative_server_is_exact_streamed_or_not(spec_server, expected):
    """Each completion equals one process without speculation; a stream's deltas add up to the same text; a
    stop string cuts the text where it would without speculation; the metrics count the drafts."""
    client = openai.OpenAI(base_url=spec_server.url + "/v1", api_key=API_KEY)
    name = spec_server.model_name
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0, extra_body=GO)
        assert got.choices[0].text == want
        parts = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                          extra_body=GO)
        assert "".join(c.choices[0].text for c in parts) == want
    stop = expected[0].split()[5]
    cut = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop],
                                    extra_body=GO)
    assert cut.choices[0].text == expected[0][:expected[0].index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    m = spec_server.metrics()
    assert m["meshlm_spec_decode_num_drafts_total"] > 0
    assert m["meshlm_spec_decode_num_draft_tokens_total"] >= m["meshlm_spec_decode_num_accepted_tokens_total"]
