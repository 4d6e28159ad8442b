"""Typed messages between the HTTP layer and the engine loop; the OpenAI response shapes built from them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlm.config import SamplingParams
from meshlm.engine.request import TokenLogprob


@dataclass(frozen=True)
class Deadline:
    """When a request must be done: `at` on the time.monotonic() clock, from a budget fixed at its arrival."""

    at: float
    budget_s: float  # seconds from arrival to `at`
    source: str  # what set the budget: "X-Request-Timeout" or "--request-timeout"

    def remaining(self) -> float:
        """Seconds left (negative once missed)."""
        return self.at - time.monotonic()


@dataclass(frozen=True)
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request: token ids and one params per choice."""

    chat: bool
    model: str
    prompts: tuple[tuple[int, ...], ...]  # one entry per prompt (chat: exactly one)
    params: tuple[SamplingParams, ...]  # one per choice: prompt i, sample j -> params[i * n + j]
    n: int
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    deadline: Deadline | None = None  # fixed at arrival; bounds queueing, retries and the run

    @property
    def num_choices(self) -> int:
        """Engine requests this HTTP request becomes."""
        return len(self.params)

    def prompt_of(self, choice: int) -> tuple[int, ...]:
        """The prompt a choice continues."""
        return self.prompts[choice // self.n]


@dataclass(frozen=True)
class FinalStats:
    """Figures of a finished engine request (seconds)."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_s: float
    queue_s: float
    e2e_s: float
    num_preemptions: int
    num_cached_tokens: int


@dataclass(frozen=True)
class Update:
    """What changed in one engine request since the last update (engine thread -> event loop)."""

    choice: int
    text: str  # the whole text so far (strings are immutable: safe to hand across threads)
    token_ids: tuple[int, ...] = ()  # new tokens
    logprobs: tuple[TokenLogprob, ...] = ()  # new entries
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "timeout" | "error"
    error: str | None = None
    stats: FinalStats | None = None


@dataclass
class ChoiceState:
    """A choice as the HTTP layer accumulates it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    sent: int = 0  # characters of text already streamed
    stats: FinalStats | None = None


def new_id(chat: bool) -> str:
    """An OpenAI-style response id."""
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def now_s() -> int:
    """The `created` timestamp."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_finish(reason: str | None) -> str | None:
    """Engine finish reasons as OpenAI names them (timeouts and aborts never reach a 200 body)."""
    return None if reason is None else ("stop" if reason == "stop" else "length")


def completion_logprobs(entries: list[TokenLogprob], token_str: Callable[[int], str],
                        offset: int = 0) -> dict[str, Any]:
    """The /v1/completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_str(e.token_id) for e in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_str(t): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], token_str: Callable[[int], str]) -> dict[str, Any]:
    """The chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(tid: int, lp: float) -> dict[str, Any]:
        s = token_str(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top.items()]} for e in entries]}


def completion_body(rid: str, model: str, created: int, choices: list[dict[str, Any]],
                    use: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
    """A text_completion object (a whole response, or one streamed chunk)."""
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                            "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, created: int, choices: list[dict[str, Any]],
              use: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
    """A chat.completion object, or a chat.completion.chunk."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
                            "created": created, "model": model, "system_fingerprint": None,
                            "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body
