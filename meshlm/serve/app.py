"""The FastAPI app: OpenAI routes, /health, /metrics; auth, size and content-type guards; one error shape."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from meshlm.serve.config import ServerConfig
from meshlm.serve.errors import APIError, error_body, invalid
from meshlm.serve.intake import TIMEOUT_HEADER, bearer_token, read_body, request_deadline
from meshlm.serve.metrics import CONTENT_TYPE, ServerMetrics
from meshlm.serve.router import Router
from meshlm.serve.streaming import Generation
from meshlm.serve.validation import ModelContext, parse_generation, read_json

log = logging.getLogger(__name__)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerState:
    """What the routes share: config, model facts, the router over the replicas, metrics, the drain flag."""

    def __init__(self, cfg: ServerConfig, ctx: ModelContext | None, engine: Router, metrics: ServerMetrics,
                 token_str: Any) -> None:
        self.cfg, self.ctx, self.engine, self.metrics = cfg, ctx, engine, metrics  # ctx: set once replicas load
        self.token_str = token_str
        self.draining = False
        self.inflight = 0  # generation requests not yet answered
        self.started = int(time.time())

    def unavailable(self) -> str | None:
        """Why the server cannot take work now, or None."""
        if self.draining:
            return "The server is shutting down and admits no new requests; retry on another server."
        return self.engine.unavailable()


def _json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


class Guard:
    """ASGI middleware: API key on every route but /health (constant-time compare); counts responses."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state
        key = state.cfg.api_key
        self.expected = key.encode() if key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def counting_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            if self.expected is not None and not path.startswith("/health"):
                if not hmac.compare_digest(bearer_token(scope.get("headers") or []), self.expected):
                    self.state.metrics.rejected.labels(reason="auth").inc()
                    err = APIError(401, "Missing or wrong API key; send 'Authorization: Bearer <key>'.",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                    return await _json_error(err)(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.http.labels(route=route, status=str(status["code"])).inc()


class SSEResponse(StreamingResponse):
    """Streams events while watching for the client to go away; on disconnect the stream is cancelled."""

    def __init__(self, gen: Generation, on_disconnect: Callable[[], None]) -> None:
        super().__init__(gen.stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen, self.on_disconnect = gen, on_disconnect

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)  # cancelled when the stream ends first
                if not self.gen.finished:  # not a client closing just after the last event
                    self.on_disconnect()
                tg.cancel_scope.cancel()
        finally:
            self.gen.close()
            await self.body_iterator.aclose()


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _or_gone(request: Request, work: Awaitable[Any]) -> asyncio.Future | None:
    """Run work unless the client disconnects first: its finished task, or None (work cancelled)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        return task if task.done() else None
    finally:
        gone.cancel()
        task.cancel()


def _gone(state: ServerState, stage: str) -> Response:
    """Count a client that left before its answer; the 499 nobody reads (it labels the HTTP metric)."""
    state.metrics.disconnects.labels(stage=stage).inc()
    return Response(status_code=499)


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    arrived = time.monotonic()
    cfg = state.cfg
    why = state.unavailable()
    if why is not None:
        raise APIError(503, why, code="unavailable", headers={"Retry-After": str(cfg.retry_after_s)},
                       reason="draining" if state.draining else "unavailable")
    deadline = request_deadline(request.headers.get(TIMEOUT_HEADER), cfg.request_timeout_s, arrived)
    try:
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
    except ClientDisconnect:
        log.warning("client %s disconnected while sending the body of %s", _client(request), request.url.path)
        return _gone(state, "body")
    req = replace(parse_generation(read_json(body, request.headers.get("content-type")), chat, state.ctx),
                  deadline=deadline)
    stats = state.engine.snapshot.stats
    cap, each = stats.max_waiting, state.engine.max_waiting_each  # a request's choices go to one replica
    if req.num_choices > each:
        raise invalid(f"This request needs {req.num_choices} queue places ({len(req.prompts)} prompt(s) x "
                      f"n={req.n}) but the server queues at most {each} (--max-waiting); lower n or send fewer "
                      "prompts per request.", "n" if req.n > 1 else "prompt", "exceeds_queue_cap")
    if stats.waiting + state.engine.pending + req.num_choices > cap:  # fast path; the engine checks exactly
        raise APIError(429, f"{stats.waiting} requests are waiting (the cap is {cap}); retry shortly.",
                       code="queue_full", headers={"Retry-After": str(state.cfg.retry_after_s)},
                       reason="queue_full")

    def release(g: Generation) -> None:
        state.inflight -= 1
        if g.missed is not None:
            state.metrics.deadline.labels(stage=g.missed).inc()

    gen = Generation(state.engine, req, state.token_str, cfg.retry_after_s, release)
    state.inflight += 1
    try:
        await gen.start()
    except BaseException:
        gen.closed = True
        gen.engine.abort(gen.request_ids)  # a cancelled submit may still be applied
        release(gen)
        raise
    streaming = False
    try:  # a stream's headers wait for its first token, so a failure before it gets an HTTP status
        done = await _or_gone(request, gen.first() if req.stream else gen.collect())
        if done is None:
            return _gone(state, "response")
        result = done.result()
        if req.stream:
            streaming = True
            return SSEResponse(gen, state.metrics.disconnects.labels(stage="stream").inc)
        return JSONResponse(result)
    finally:
        if not streaming:
            gen.close()


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def create_app(state: ServerState) -> FastAPI:
    """The app, its routes and error handlers."""
    app = FastAPI(title="meshlm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        if err.status < 500 or err.reason in ("draining", "unavailable"):  # refused, not failed
            state.metrics.rejected.labels(reason=err.reason).inc()
        return _json_error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = exc.status_code
        msg = (f"No route {request.method} {request.url.path}; see /v1/models, /v1/completions, "
               "/v1/chat/completions, /health, /metrics." if code in (404, 405) else str(exc.detail))
        return JSONResponse(error_body(code, msg, None, f"http_{code}"), code)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        body = error_body(500, f"Internal error: {type(exc).__name__}", None, "internal_error")
        return JSONResponse(body, 500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    def model_card() -> dict[str, Any]:
        return {"id": state.cfg.model_name, "object": "model", "created": state.started, "owned_by": "meshlm",
                "max_model_len": state.ctx.max_context}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model not in state.ctx.names:
            raise APIError(404, f"The model {model!r} does not exist.", "model", "model_not_found",
                           reason="unknown_model")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while some replica is routable; the replicas' states (and reasons) either way."""
        why, replicas = state.unavailable(), state.engine.health()
        if why is not None:
            return JSONResponse({**error_body(503, why, None, "unhealthy"), "replicas": replicas}, 503)
        return JSONResponse({"status": "ok", "replicas": replicas})

    @app.get("/health/{replica}")
    async def replica_health(replica: int) -> JSONResponse:
        """One replica: 200 while it is routable, else 503 with why."""
        replicas = state.engine.health()
        if not 0 <= replica < len(replicas):
            raise APIError(404, f"There is no replica {replica}; this server has {len(replicas)} (0.."
                           f"{len(replicas) - 1}).", code="not_found", reason="unknown_replica")
        entry = replicas[replica]
        if entry["state"] != "healthy" or entry["circuit"] != "closed":
            why = entry.get("reason") or f"replica {replica} is {entry['state']}"
            return JSONResponse({**error_body(503, why, None, "unhealthy"), **entry}, 503)
        return JSONResponse({"status": "ok", **entry})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(Guard, state=state)
    if state.cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.cfg.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", TIMEOUT_HEADER])
    return app
