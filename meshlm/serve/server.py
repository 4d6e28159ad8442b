"""`meshlm serve`: start the replicas (each loads the model over its ranks), route to them, serve HTTP.

SIGTERM (or Ctrl-C) stops admission (new requests and /health answer 503), waits for in-flight requests
up to --drain-timeout, aborts the rest, stops the replicas and exits 0. A second signal stops at once. A
failed replica is restarted while the others serve (serve/router.py); with --exit-on-failure a failure
instead makes every in-flight request fail with an error and the process exit 1.
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

from meshlm.errors import MeshlmError
from meshlm.serve.app import ServerState, create_app
from meshlm.serve.config import ServerConfig
from meshlm.serve.fleet import RouterConfig
from meshlm.serve.h11_protocol import MAX_HEADER_BYTES, protocol_class
from meshlm.serve.metrics import ReplicaCollector, ServerMetrics
from meshlm.serve.replica import Ready, ReplicaSpec
from meshlm.serve.router import Router
from meshlm.serve.validation import ModelContext

log = logging.getLogger(__name__)


def serve(spec: ReplicaSpec, tokenizer: Any, cfg: ServerConfig, rcfg: RouterConfig, aliases: tuple[str, ...] = (),
          log_level: str = "warning", key_env: str | None = None) -> int:
    """Start rcfg.dp replicas of spec, serve until a signal (or a fatal failure); the exit code."""
    tok = tokenizer
    holder: dict[str, DrainingServer] = {}
    router = Router(spec, rcfg, tok.bos_id or 0, on_fatal=lambda msg: holder["server"].fatal(msg))
    metrics = ServerMetrics(lambda: router.snapshot)
    metrics.registry.register(ReplicaCollector(router))
    router.observe, router.on_finish = metrics.observe_failure, metrics.observe_finish
    token_str = functools.lru_cache(maxsize=1 << 16)(lambda t: tok.decode([t], skip_special=False))
    state = ServerState(cfg, None, router, metrics, token_str)

    def loaded(info: Ready) -> None:
        state.ctx = ModelContext(frozenset({cfg.model_name, *aliases}), info.vocab_size, info.max_context,
                                 info.capacity_tokens, cfg.max_n, tok.encode,
                                 lambda msgs: tok.encode(tok.apply_chat_template(msgs), add_special=False),
                                 cfg.default_max_tokens)
        router.probe_token = tok.bos_id if tok.bos_id is not None and tok.bos_id < info.vocab_size else 0
        auth = f" -H \"Authorization: Bearer ${key_env or 'KEY'}\"" if cfg.api_key else ""
        body = json.dumps({"model": cfg.model_name, "max_tokens": 32,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        print(f"meshlm: serving {cfg.model_name} on http://{cfg.host}:{cfg.port} with {rcfg.dp} replica(s). Try:"
              f"\n  curl http://{cfg.host}:{cfg.port}/v1/chat/completions -H 'Content-Type: "
              f"application/json'{auth} -d '{body}'", file=sys.stderr, flush=True)

    config = uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level=log_level,
                            access_log=False, lifespan="off", timeout_graceful_shutdown=3,
                            http=protocol_class(lambda code: metrics.rejected.labels(reason=code).inc()),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    server = holder["server"] = DrainingServer(config, state, loaded)
    try:
        server.run()
    finally:
        router.close()
    return server.exit_code


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the listening socket."""

    def __init__(self, config: uvicorn.Config, state: ServerState, loaded: Any) -> None:
        super().__init__(config)
        self.state, self.loaded = state, loaded
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    async def startup(self, sockets: Any = None) -> None:
        """Start the replicas (a replica that cannot load ends the server, exit 1), then listen."""
        self.aloop = asyncio.get_running_loop()
        try:
            self.loaded(await self.state.engine.start())
        except MeshlmError as e:
            print(f"meshlm: error: {e}", file=sys.stderr, flush=True)
            self.exit_code, self.should_exit = 1, True
            return
        await super().startup(sockets)

    async def shutdown(self, sockets: Any = None) -> None:
        """Close the connections, then stop the replicas while the threads that spawned them still live."""
        await super().shutdown(sockets)
        self.state.engine.close()

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
        """A replica failed under --exit-on-failure: exit 1 once in-flight requests have had their errors."""
        self.exit_code = 1
        print(f"meshlm: error: {msg}; shutting down", file=sys.stderr, flush=True)
        if self.aloop is not None:
            self.aloop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._exit_soon()))
        else:
            self.should_exit = True

    async def _exit_soon(self) -> None:
        await asyncio.sleep(1.0)
        self.should_exit = True
