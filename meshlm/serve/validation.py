"""Strict parsing of request bodies into GenerationRequests: a bad field is a 400 naming it and the fix."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from meshlm.config import SamplingParams
from meshlm.errors import MeshlmError
from meshlm.serve.errors import APIError, invalid
from meshlm.serve.protocol import GenerationRequest

MAX_LOGPROBS = 20
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_MOD = 2**63


@dataclass(frozen=True)
class ModelContext:
    """What validation needs to know about the served model."""

    names: frozenset[str]
    vocab_size: int
    max_context: int
    capacity_tokens: int  # the whole KV pool, in tokens
    max_n: int
    encode: Callable[[str], list[int]]
    encode_chat: Callable[[list[dict[str, str]]], list[int]]


def read_json(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The body as a JSON object; 415 for another content type; 400 for bad UTF-8, bad JSON, a non-object."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}; send a "
                       "JSON body with that header.", code="unsupported_media_type", reason="content_type")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"The body is not valid UTF-8 (byte {e.start}); encode the JSON as UTF-8.",
                      code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid(f"The body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.",
                      code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"The body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    return data


def _int(d: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = d.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"{name} must be an integer, got {json.dumps(v)}.", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise invalid(f"{name} must be {rng}, got {v}.", name)
    return v


def _number(d: dict, name: str, default: float) -> float:
    v = d.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(f"{name} must be a finite number, got {json.dumps(v)}.", name)
    return float(v)


def _bool(d: dict, name: str, default: bool = False) -> bool:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"{name} must be true or false, got {json.dumps(v)}.", name)
    return v


def _token_ids(v: Any, name: str, vocab: int) -> list[int]:
    if not isinstance(v, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in v):
        raise invalid(f"{name} must be a list of integer token ids.", name)
    bad = next((t for t in v if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"token id {bad} in {name} is outside the vocabulary [0, {vocab}).", name,
                      "invalid_token_id")
    return list(v)


def _unsupported(d: dict, chat: bool) -> None:
    """Refuse OpenAI features meshlm does not implement rather than silently ignoring them."""
    for name in ("presence_penalty", "frequency_penalty"):
        if d.get(name) not in (None, 0, 0.0):
            raise invalid(f"{name} is not supported; leave it unset or 0.", name, "unsupported")
    if d.get("logit_bias") not in (None, {}):
        raise invalid("logit_bias is not supported; leave it unset.", "logit_bias", "unsupported")
    if chat:
        if d.get("tools") not in (None, []) or d.get("functions") not in (None, []):
            raise invalid("tool calling is not supported; send no tools.", "tools", "unsupported")
        fmt = d.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise invalid("response_format other than {\"type\": \"text\"} is not supported.",
                          "response_format", "unsupported")
    else:
        if d.get("echo") not in (None, False):
            raise invalid("echo is not supported; leave it unset or false.", "echo", "unsupported")
        if d.get("suffix") is not None:
            raise invalid("suffix is not supported; leave it unset.", "suffix", "unsupported")


def _model(d: dict, ctx: ModelContext) -> str:
    model = d.get("model")
    if model is None:
        raise invalid("model is required; GET /v1/models lists the served model.", "model",
                      "missing_required")
    if not isinstance(model, str):
        raise invalid("model must be a string.", "model")
    if model not in ctx.names:
        raise APIError(404, f"The model {model!r} does not exist; this server serves "
                       f"{', '.join(sorted(ctx.names))}.", "model", "model_not_found", reason="unknown_model")
    return model


def _completion_prompts(d: dict, ctx: ModelContext) -> list[list[int]]:
    p = d.get("prompt")
    if p is None:
        raise invalid("prompt is required.", "prompt", "missing_required")
    if isinstance(p, str):
        items: list[Any] = [p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        items = [p]
    elif isinstance(p, list):
        items = p
    else:
        raise invalid("prompt must be a string, a list of strings, or token ids.", "prompt")
    if not items:
        raise invalid("prompt is empty; send at least one token of text.", "prompt", "empty_prompt")
    out = []
    for item in items:
        ids = ctx.encode(item) if isinstance(item, str) else _token_ids(item, "prompt", ctx.vocab_size)
        if not ids:
            raise invalid("prompt is empty; send at least one token of text.", "prompt", "empty_prompt")
        out.append(ids)
    return out


def _chat_prompt(d: dict, ctx: ModelContext) -> list[int]:
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages must be a non-empty list of {role, content} objects.", "messages",
                      "empty_prompt" if msgs == [] else "invalid_value")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid(f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}.",
                          f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                       for x in content):
                raise invalid(f"messages[{i}].content parts must be text parts ({{\"type\": \"text\"}}).",
                              f"messages[{i}].content", "unsupported")
            content = "".join(x["text"] for x in content)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string.", f"messages[{i}].content")
        clean.append({"role": m["role"], "content": content})
    try:
        ids = ctx.encode_chat(clean)
    except MeshlmError as e:
        raise invalid(str(e), "messages") from None
    if not ids:
        raise invalid("messages render to an empty prompt; send some content.", "messages", "empty_prompt")
    return ids


def _stop(d: dict) -> tuple[str, ...]:
    stop = d.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > MAX_STOP:
        raise invalid(f"stop must be a string or a list of at most {MAX_STOP} strings.", "stop")
    if any(s == "" for s in items):
        raise invalid("stop strings must be non-empty; remove the empty string from stop.", "stop")
    return tuple(items)


def _max_tokens(d: dict, chat: bool, longest: int, ctx: ModelContext) -> int:
    name = "max_completion_tokens" if chat and d.get("max_completion_tokens") is not None else "max_tokens"
    room = ctx.max_context - longest
    if room < 1:
        raise invalid(f"The prompt has {longest} tokens but the model's context length is {ctx.max_context}; "
                      "shorten the prompt (at least one token must remain for generation).", "prompt",
                      "context_length_exceeded")
    mt = _int(d, name, None, 1)
    if mt is None:  # default: what is left of the context (and of the KV pool)
        return max(1, min(room, ctx.capacity_tokens - longest))
    if longest + mt > ctx.max_context:
        raise invalid(f"This model's maximum context length is {ctx.max_context} tokens, but the request "
                      f"asks for {longest + mt} ({longest} in the prompt + {mt} in {name}); lower {name} to "
                      f"at most {room} or shorten the prompt.", name, "context_length_exceeded")
    return mt


def parse_generation(d: dict[str, Any], chat: bool, ctx: ModelContext) -> GenerationRequest:
    """Validate a completions (chat=False) or chat body; raises APIError naming the offending field."""
    model = _model(d, ctx)
    _unsupported(d, chat)
    n = _int(d, "n", 1, 1, ctx.max_n)
    best_of = _int(d, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise invalid("best_of other than n is not supported; leave it unset.", "best_of", "unsupported")
    temperature = _number(d, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise invalid(f"temperature must be between 0 and 2, got {temperature}.", "temperature")
    top_p = _number(d, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise invalid(f"top_p must be in (0, 1], got {top_p}; use 1 to disable nucleus sampling.", "top_p")
    top_k = _int(d, "top_k", 0, -1)
    if chat:
        want = _bool(d, "logprobs")
        top = _int(d, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want:
            raise invalid("top_logprobs needs logprobs set to true.", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _int(d, "logprobs", None, 0, MAX_LOGPROBS)
    seed = _int(d, "seed", None, -(2**63), 2**64 - 1)
    stop = _stop(d)
    stop_ids = _token_ids(d.get("stop_token_ids") or [], "stop_token_ids", ctx.vocab_size)
    ignore_eos = _bool(d, "ignore_eos")
    timeout = None if d.get("timeout") is None else _number(d, "timeout", 0.0)  # extension: seconds
    if timeout is not None and timeout <= 0:
        raise invalid(f"timeout must be a positive number of seconds, got {timeout}.", "timeout")
    stream = _bool(d, "stream")
    opts = d.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("stream_options must be an object.", "stream_options")
    include_usage = _bool(opts or {}, "include_usage")
    if d.get("user") is not None and not isinstance(d["user"], str):
        raise invalid("user must be a string.", "user")
    prompts = [_chat_prompt(d, ctx)] if chat else _completion_prompts(d, ctx)
    if len(prompts) * n > ctx.max_n:
        raise invalid(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; the cap is "
                      f"{ctx.max_n}.", "prompt" if n == 1 else "n")
    max_tokens = _max_tokens(d, chat, max(len(p) for p in prompts), ctx)
    try:
        base = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0),
                              top_p=top_p, stop=stop, stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos,
                              logprobs=logprobs)
    except MeshlmError as e:
        raise invalid(str(e)) from None
    params = []
    for i in range(len(prompts) * n):
        s = (seed + i) % SEED_MOD if seed is not None else (None if base.greedy else random.getrandbits(63))
        params.append(replace(base, seed=s))
    return GenerationRequest(chat, model, tuple(tuple(p) for p in prompts), tuple(params), n, stream,
                             include_usage, logprobs, timeout)
