"""End-to-end fixtures: a tiny model with a 2048-token context and one shared `meshlm serve` at tp=2."""

from __future__ import annotations

import pytest
from serve_harness import Server, write_model


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory):
    """The model every e2e server loads (random weights, WordLevel 'w<i>.' tokenizer)."""
    return write_model(tmp_path_factory.mktemp("serve") / "tiny-llama")


@pytest.fixture(scope="session")
def long_model(tmp_path_factory):
    """The same tiny model with a 16k context: a request of 15000 tokens runs for many seconds anywhere."""
    return write_model(tmp_path_factory.mktemp("serve-long") / "tiny-llama-16k", max_position=16384)


@pytest.fixture(scope="session")
def server(serve_model):
    """A shared server at tp=2 with an API key; stopped with SIGTERM at the end (exit 0, no leftovers)."""
    srv = Server(serve_model, "--kv-cache-mb", "32").wait_healthy()
    yield srv
    code = srv.stop()
    assert code == 0, srv.output()
    assert not srv.leftovers(), "rank processes outlived the server"


@pytest.fixture(scope="session")
def small_server(serve_model):
    """2 running seats, 4 waiting places, short body and max_tokens defaults: overload, queueing and limits."""
    srv = Server(serve_model, "--max-num-seqs", "2", "--max-waiting", "4", "--kv-cache-mb", "16",
                 "--request-timeout", "120", "--body-timeout", "1", "--default-max-tokens", "8").wait_healthy()
    yield srv
    assert srv.stop() == 0, srv.output()
    assert not srv.leftovers()
