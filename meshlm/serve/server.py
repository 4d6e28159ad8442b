"""`meshlm serve`: load the model over its ranks, run the engine loop, serve HTTP; drain on SIGTERM.

SIGTERM (or Ctrl-C) stops admission (new requests and /health answer 503), waits for in-flight requests
up to --drain-timeout, aborts the rest, stops the ranks and exits 0. A second signal stops at once. A
failed rank makes every in-flight request fail with an error, /health answer 503, and the process exit 1.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from typing import Any

import uvicorn

from meshlm.serve.app import ServerState, create_app
from meshlm.serve.config import ServerConfig
from meshlm.serve.engine_loop import EngineLoop
from meshlm.serve.h11_protocol import MAX_HEADER_BYTES, protocol_class
from meshlm.serve.metrics import ServerMetrics
from meshlm.serve.validation import ModelContext

log = logging.getLogger(__name__)


SWITCH_INTERVAL_S = 0.0002  # how long a thread may hold the GIL while another waits for it


def serve(llm: Any, cfg: ServerConfig, aliases: tuple[str, ...] = (), log_level: str = "warning",
          key_env: str | None = None, comm_timeout_s: float = 60.0) -> int:
    """Serve an already-built LLM until a signal or a fatal engine error; the exit code."""
    tok, engine = llm.tokenizer, llm.engine
    holder: dict[str, DrainingServer] = {}

    loop = EngineLoop(engine, on_fatal=lambda msg: holder["server"].fatal(msg),
                      keepalive_s=max(0.5, min(10.0, comm_timeout_s / 4)))
    metrics = ServerMetrics(lambda: loop.snapshot)
    loop.on_finish = metrics.observe_finish
    ctx = ModelContext(frozenset({cfg.model_name, *aliases}), llm.cfg.vocab_size, llm.max_context,
                       engine.capacity_tokens, cfg.max_n, tok.encode,
                       lambda msgs: tok.encode(tok.apply_chat_template(msgs), add_special=False),
                       cfg.default_max_tokens)
    token_str = functools.lru_cache(maxsize=1 << 16)(lambda t: tok.decode([t], skip_special=False))
    probe = tok.bos_id if tok.bos_id is not None and tok.bos_id < llm.cfg.vocab_size else 0
    state = ServerState(cfg, ctx, loop, metrics, token_str, probe)
    config = uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level=log_level,
                            access_log=False, lifespan="off", timeout_graceful_shutdown=3,
                            http=protocol_class(lambda code: metrics.rejected.labels(reason=code).inc()),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    server = holder["server"] = DrainingServer(config, state)
    # The engine thread and the event loop share the GIL; at Python's default 5 ms switch interval the
    # engine waits up to 5 ms each time the loop holds it (streaming a token), several times per step.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    loop.start()
    auth = f" -H \"Authorization: Bearer ${key_env or 'KEY'}\"" if cfg.api_key else ""
    body = json.dumps({"model": cfg.model_name, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    print(f"meshlm: serving {cfg.model_name} on http://{cfg.host}:{cfg.port} over {llm.dims.world_size} "
          f"rank(s). Try:\n  curl http://{cfg.host}:{cfg.port}/v1/chat/completions -H 'Content-Type: "
          f"application/json'{auth} -d '{body}'", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        loop.stop(timeout=10.0)
    return server.exit_code


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the listening socket."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    async def startup(self, sockets: Any = None) -> None:
        """Remember the event loop (signal handlers and the engine thread schedule work on it)."""
        self.aloop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """First signal: drain; a second one (or one before serving starts): stop now."""
        if self.aloop is None or self.state.draining:
            self.force_exit = self.state.draining
            self.should_exit = True
            return
        self.aloop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        """Refuse new work, wait for in-flight requests (abort them at the deadline), then stop."""
        s = self.state
        s.draining = True
        print(f"meshlm: draining {s.inflight} request(s) (up to {s.cfg.drain_timeout_s:g} s)",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + s.cfg.drain_timeout_s
        while s.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if s.inflight:
            log.warning("drain timeout: aborting %d request(s)", s.inflight)
            s.engine.abort(None)
            deadline = time.monotonic() + 5.0
            while s.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True

    def fatal(self, msg: str) -> None:
        """From the engine thread: exit 1 once in-flight requests have had their errors."""
        self.exit_code = 1
        print(f"meshlm: error: {msg}; shutting down", file=sys.stderr, flush=True)
        if self.aloop is not None:
            self.aloop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._exit_soon()))
        else:
            self.should_exit = True

    async def _exit_soon(self) -> None:
        await asyncio.sleep(1.0)
        self.should_exit = True
