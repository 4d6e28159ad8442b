"""`meshlm serve --join`: a remote replica's first connection to the router retries until the router listens."""

from __future__ import annotations

import logging
import socket
import threading
import time
from multiprocessing.connection import Listener

import pytest

from meshlm.serve.links import RouterUnreachable, connect

KEY = b"join-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_later(port: int, delay: float, key: bytes, got: list) -> threading.Thread:
    """A router's listener that opens `delay` seconds from now and accepts one connection (or its failure)."""
    def run() -> None:
        time.sleep(delay)
        with Listener(("127.0.0.1", port), authkey=key) as listener:
            try:
                conn = listener.accept()
            except Exception as e:  # noqa: BLE001 - the test reads what the router saw
                got.append(e)
                return
            got.append(conn.recv())
            conn.send("welcome")
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_join_waits_for_a_router_that_starts_late(caplog):
    """The router's port opens 1.2 s after the replica starts: the replica retries (each attempt logged with the
    address and the reason) and connects, then talks over the authenticated connection."""
    port, got = _free_port(), []
    server = _listen_later(port, 1.2, KEY, got)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="meshlm.serve.links"):
        conn = connect(("127.0.0.1", port), KEY, timeout_s=20)
    assert time.monotonic() - t0 >= 1.2
    conn.send("hello")
    assert conn.recv() == "welcome"
    conn.close()
    server.join(5)
    assert got == ["hello"]
    tries = [r.getMessage() for r in caplog.records]
    assert tries and all(f"router at 127.0.0.1:{port} not reachable" in m and "refused" in m.lower() for m in tries)


def test_join_gives_up_at_its_deadline_naming_the_address_and_fix():
    """Nothing ever listens: the replica fails after about timeout_s with an error naming the address and the fix."""
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(RouterUnreachable, match=rf"127\.0\.0\.1:{port} in 1\.5 s .*--replica-listen .*--join-timeout"):
        connect(("127.0.0.1", port), KEY, timeout_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 3.0


def test_join_with_the_wrong_key_fails_at_once():
    """A router that refuses the key is reached: retrying cannot help, the error names the secret's variable."""
    port, got = _free_port(), []
    server = _listen_later(port, 0.0, b"another-secret", got)
    t0 = time.monotonic()
    with pytest.raises(RouterUnreachable, match=f"127.0.0.1:{port} refused this replica.*MESHLM_REPLICA_KEY"):
        connect(("127.0.0.1", port), KEY, timeout_s=20)
    assert time.monotonic() - t0 < 5
    server.join(5)
    assert got and isinstance(got[0], Exception)
