"""One HTTP generation request: its engine requests, their updates, and the response built from them.

Streaming holds back text that could be the start of a stop string (the engine cuts the text at a stop
string only once it is complete), so a stop string spanning tokens never leaks into a chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from meshlm.engine.scheduler import QueueFull
from meshlm.errors import RequestError
from meshlm.serve.engine_loop import EngineUnavailable
from meshlm.serve.errors import APIError, error_body, invalid
from meshlm.serve.protocol import (
    ChoiceState,
    GenerationRequest,
    Update,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    new_id,
    now_s,
    openai_finish,
    usage,
)

log = logging.getLogger(__name__)


def releasable(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of text that can be sent: all but the longest suffix that begins a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return len(text) - hold


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class Generation:
    """The engine requests behind one HTTP request (n choices per prompt) and their accumulated state.

    `engine` is the router (serve/router.py): submit(), abort() and next_id()."""

    def __init__(self, engine: Any, req: GenerationRequest, token_str: Callable[[int], str],
                 retry_after_s: int, on_close: Callable[[Generation], None] = lambda g: None) -> None:
        self.engine, self.req, self.token_str = engine, req, token_str
        self.retry_after_s, self.on_close = retry_after_s, on_close
        self.id, self.created = new_id(req.chat), now_s()
        num = engine.next_id()
        self.request_ids = [f"{self.id}-{num}-{i}" for i in range(req.num_choices)]
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.choices = [ChoiceState() for _ in range(req.num_choices)]
        self.closed = False
        self.missed: str | None = None  # "queue" or "run" once the deadline passed before / after a token
        self._ready: list[Update] = []  # updates taken by first() that stream() has not sent yet

    @property
    def finished(self) -> bool:
        """True once every choice has a finish reason."""
        return all(c.finish_reason is not None for c in self.choices)

    async def start(self) -> None:
        """Queue the engine requests; engine refusals become API errors (429 when the queue is full)."""
        timeout_s = None if self.req.deadline is None else self.req.deadline.remaining()
        if timeout_s is not None and timeout_s <= 0:
            raise self._missed()
        try:
            await self.engine.submit(self.request_ids, [list(self.req.prompt_of(i)) for i in
                                                        range(self.req.num_choices)],
                                     list(self.req.params), self.queue, timeout_s,
                                     deadline=None if self.req.deadline is None else self.req.deadline.at)
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full", {"Retry-After": str(self.retry_after_s)},
                           reason="queue_full") from None
        except RequestError as e:
            raise invalid(str(e)) from None
        except EngineUnavailable as e:
            raise APIError(503, f"The engine is unavailable: {e}", code="engine_unavailable",
                           headers={"Retry-After": str(self.retry_after_s)}, reason="unavailable") from None

    def close(self) -> None:
        """Abort unfinished engine requests (client gone, server draining), release the slot; idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self.engine.abort(self.request_ids)
        self.on_close(self)

    async def _next(self) -> list[Update]:
        """The next batch of updates (waits for one, then takes whatever else is ready)."""
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        for u in batch:
            c = self.choices[u.choice]
            if u.finish_reason in (None, "stop", "length"):
                c.text = u.text
            c.token_ids.extend(u.token_ids)
            c.logprobs.extend(u.logprobs)
            c.finish_reason = c.finish_reason or u.finish_reason
            c.stats = u.stats or c.stats
        return batch

    def _failure(self) -> APIError | None:
        """The error to report when a choice ended without a result."""
        reasons = {c.finish_reason for c in self.choices}
        err = next((c for c in self.choices if c.finish_reason == "error"), None)
        if err is not None:
            return APIError(503, "The engine failed while serving this request; retry on a healthy server.",
                            code="engine_failure", reason="engine_failure")
        if "timeout" in reasons:
            return self._missed()
        if "abort" in reasons:
            return APIError(503, "The server is shutting down; retry on another server.", code="aborted",
                            reason="aborted")
        return None

    def _missed(self) -> APIError:
        """The 504 for a missed deadline; notes whether it passed in the queue or while running."""
        d = self.req.deadline
        tokens = sum(len(c.token_ids) for c in self.choices)
        self.missed = "run" if tokens else "queue"
        when = f"after {tokens} generated token(s)" if tokens else "before its first token (it was queued)"
        return APIError(504, f"The request missed its deadline of {d.budget_s:g} s (set by {d.source}) {when}; "
                        "allow more time with the X-Request-Timeout header (up to the server's "
                        "--request-timeout), lower max_tokens, or retry when the server is less busy.",
                        code="timeout", reason="timeout")

    async def first(self) -> None:
        """Wait for the first update (a token or an end); raises the APIError of a request that failed before
        any token, so a stream that never started is answered with an HTTP status, not an event in a 200."""
        self._ready = await self._next()
        if self.finished and not any(c.token_ids for c in self.choices):
            err = self._failure()
            if err is not None:
                raise err

    def _usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.req.prompts), sum(len(c.token_ids) for c in self.choices))

    def _logprobs(self, c: ChoiceState, entries: list, offset: int = 0) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        if self.req.chat:
            return chat_logprobs(entries, self.token_str)
        return completion_logprobs(entries, self.token_str, offset)

    async def collect(self) -> dict[str, Any]:
        """Wait for every choice; the whole response body (raises APIError when a choice failed)."""
        while not self.finished:
            await self._next()
        err = self._failure()
        if err is not None:
            raise err
        choices = []
        for i, c in enumerate(self.choices):
            lp = self._logprobs(c, c.logprobs)
            reason = openai_finish(c.finish_reason)
            if self.req.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                "logprobs": lp, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": c.text, "logprobs": lp, "finish_reason": reason})
        build = chat_body if self.req.chat else completion_body
        return build(self.id, self.req.model, self.created, choices, self._usage())

    def _chunk(self, choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> str:
        build = chat_body if self.req.chat else completion_body
        return sse(build(self.id, self.req.model, self.created, choices, use, chunk=True))

    async def stream(self) -> AsyncIterator[str]:
        """SSE: OpenAI chunks, the usage chunk when asked, then [DONE]; an error event on failure."""
        stops = self.req.params[0].stop
        if self.req.chat:
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(len(self.choices))])
        lp_sent = [0] * len(self.choices)
        batch, self._ready = self._ready, []
        while batch or not self.finished:
            batch = batch or await self._next()
            out = []
            for i in sorted({u.choice for u in batch}):
                c = self.choices[i]
                if c.finish_reason not in (None, "stop", "length"):
                    continue
                end = len(c.text) if c.finish_reason else releasable(c.text, stops)
                delta, offset, c.sent = c.text[c.sent:end], c.sent, max(c.sent, end)
                entries, lp_sent[i] = c.logprobs[lp_sent[i]:], len(c.logprobs)
                reason = openai_finish(c.finish_reason)
                if not delta and not entries and reason is None:
                    continue
                lp = self._logprobs(c, entries, offset) if entries else None
                if self.req.chat:
                    out.append({"index": i, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                                "finish_reason": reason})
                else:
                    out.append({"index": i, "text": delta, "logprobs": lp, "finish_reason": reason})
            if out:
                yield self._chunk(out)
            batch = []
        err = self._failure()
        if err is not None:
            yield sse(error_body(err.status, err.message, None, err.code))
        elif self.req.include_usage:
            yield self._chunk([], self._usage())
        yield sse("[DONE]")
