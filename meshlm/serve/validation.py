"""Request bodies into GenerationRequests: JSON decoding, the schema's errors in the OpenAI shape, limits.

A bad field is a 400 whose one-paragraph message names the field and the fix (an unknown model is a 404).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from meshlm.config import SamplingParams
from meshlm.errors import MeshlmError
from meshlm.serve.errors import APIError, invalid
from meshlm.serve.protocol import GenerationRequest
from meshlm.serve.schema import MAX_STOP, MESSAGES, ROLES, ChatCompletionRequest, CompletionRequest, ModelContext

SEED_MOD = 2**63
MAX_DEPTH = 32  # JSON nesting a request may have (a chat body with text parts needs 5)
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate can enter valid UTF-8 JSON
CODES = ("invalid_value", "unsupported", "invalid_token_id", "empty_prompt")  # the schema's own error codes
REQUIRED = {"model": "model is required; GET /v1/models lists the served model.", "prompt": "prompt is required."}
SHAPES = {"stop": f"stop must be a string or a list of at most {MAX_STOP} strings.",
          "stop_token_ids": "stop_token_ids must be a list of integer token ids.",
          "stream_options": "stream_options must be an object.", "messages": MESSAGES}
TYPES = {"int_type": "must be an integer, got {}.", "bool_type": "must be true or false, got {}.",
         "float_type": "must be a finite number, got {}.", "finite_number": "must be a finite number, got {}.",
         "string_type": "must be a string."}


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
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(data, dict):
        raise invalid(f"The body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    if text.count("[") + text.count("{") > MAX_DEPTH or SURROGATE_ESCAPE.search(text):
        _check_tree(data)
    return data


def _too_deep() -> APIError:
    return invalid(f"The body's JSON nests objects or arrays more than {MAX_DEPTH} levels deep; a request "
                   "needs only a few levels.", code="invalid_json")


def _check_tree(data: dict[str, Any]) -> None:
    """400 for nesting deeper than MAX_DEPTH or a string holding a lone UTF-16 surrogate (not encodable text)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                name = path.lstrip(".") or None
                raise invalid(f"{name or 'A key of the body'} holds a lone UTF-16 surrogate "
                              f"(\\u{ord(value[e.start]):04x}) at character {e.start}, which is not text; "
                              "escape astral characters as a surrogate pair or send them as UTF-8.",
                              name, "invalid_encoding") from None
            continue
        if isinstance(value, (list, dict)) and depth > MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            stack += [(k, path, depth) for k in value]
            stack += [(v, f"{path}.{k}", depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value) if isinstance(v, (str, list, dict))]


def _message_error(i: int, where: tuple, data: dict[str, Any]) -> APIError:
    """messages[i] is not an object with a known role, or its content is not text."""
    name = f"messages[{i}]"
    if not where or where[0] != "content":
        return invalid(f"{name} must be an object whose role is one of {', '.join(ROLES)}.", name)
    if isinstance(data["messages"][i].get("content"), list):
        return invalid(f'{name}.content parts must be text parts ({{"type": "text"}}).', f"{name}.content",
                       "unsupported")
    return invalid(f"{name}.content must be a string.", f"{name}.content")


def _api_error(e: ValidationError, data: dict[str, Any]) -> APIError:
    """The first field error as a 400 (404 for an unknown model) naming the field and the fix."""
    err = e.errors(include_url=False)[0]
    loc, kind = err["loc"], err["type"]
    field = str(loc[0]) if loc else None
    if kind == "model_not_found":
        return APIError(404, err["msg"], "model", kind, reason="unknown_model")
    if field == "messages" and len(loc) > 1:
        return _message_error(int(loc[1]), loc[2:], data)
    name = str(loc[1]) if field == "stream_options" and len(loc) > 1 else field
    if kind in CODES:
        return invalid(err["msg"], name, kind)
    if kind == "missing" and field in REQUIRED:
        return invalid(REQUIRED[field], field, "missing_required")
    if field == "prompt":
        what = "a list of integer token ids" if isinstance(data["prompt"], list) else \
            "a string, a list of strings, or token ids"
        return invalid(f"prompt must be {what}.", field)
    if name in SHAPES:
        return invalid(SHAPES[name], name)
    return invalid(f"{name} {TYPES.get(kind, 'is not valid.').format(json.dumps(err['input']))}", name)


def _max_tokens(name: str, mt: int | None, longest: int, ctx: ModelContext) -> int:
    """The request's new-token cap: its own (checked against the context) or the server's default."""
    room = ctx.max_context - longest
    if room < 1:
        raise invalid(f"The prompt has {longest} tokens but the model's context length is {ctx.max_context}; "
                      "shorten the prompt (at least one token must remain for generation).", "prompt",
                      "context_length_exceeded")
    if mt is None:  # default: the server's cap, within what is left of the context (and of the KV pool)
        return max(1, min(room, ctx.capacity_tokens - longest, ctx.default_max_tokens))
    if longest + mt > ctx.max_context:
        raise invalid(f"This model's maximum context length is {ctx.max_context} tokens, but the request "
                      f"asks for {longest + mt} ({longest} in the prompt + {mt} in {name}); lower {name} to "
                      f"at most {room} or shorten the prompt.", name, "context_length_exceeded")
    return mt


def parse_generation(d: dict[str, Any], chat: bool, ctx: ModelContext) -> GenerationRequest:
    """Validate a completions (chat=False) or chat body; raises APIError naming the offending field."""
    try:
        body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(d, context=ctx)
    except ValidationError as e:
        raise _api_error(e, d) from None
    prompts, n = body.prompt_ids(ctx), body.n
    if len(prompts) * n > ctx.max_n:
        raise invalid(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; the cap is "
                      f"{ctx.max_n}.", "prompt" if n == 1 else "n")
    max_tokens = _max_tokens(*body.limit(), max(len(p) for p in prompts), ctx)
    logprobs = body.num_logprobs()
    try:
        base = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                              top_p=body.top_p, stop=body.stop, stop_token_ids=tuple(body.stop_token_ids),
                              ignore_eos=body.ignore_eos, logprobs=logprobs)
    except MeshlmError as e:
        raise invalid(str(e)) from None
    params = []
    for i in range(len(prompts) * n):
        s = (body.seed + i) % SEED_MOD if body.seed is not None else (
            None if base.greedy else random.getrandbits(63))
        params.append(replace(base, seed=s))
    return GenerationRequest(chat, body.model, tuple(tuple(p) for p in prompts), tuple(params), n, body.stream,
                             body.stream_options.include_usage, logprobs)
