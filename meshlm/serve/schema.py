"""OpenAI request bodies as pydantic models: /v1/completions and /v1/chat/completions.

Types are strict JSON types ("8" is not 8, true is not 1, NaN is not a number); null means unset, as
OpenAI clients send it; unknown fields are ignored, but a field for an OpenAI feature meshlm does not
implement is refused when set rather than silently ignored. Checks that need the served model read a
ModelContext passed as the validation context. Errors raised here carry their final message (but for
messages[i], which validation.py words, as it words a wrong JSON type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from meshlm.errors import MeshlmError
from meshlm.serve.errors import invalid

MAX_LOGPROBS = 20
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGES = "messages must be a non-empty list of {role, content} objects."


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
    default_max_tokens: int = 1024  # new tokens for a request that sends no max_tokens


def _fail(message: str, code: str = "invalid_value") -> PydanticCustomError:
    """A field error carrying its final message (no template: the message may hold braces)."""
    return PydanticCustomError(code, message)


def _in_range(name: str, v: int, lo: int, hi: int | None = None) -> int:
    if v < lo or (hi is not None and v > hi):
        raise _fail(f"{name} must be {f'>= {lo}' if hi is None else f'between {lo} and {hi}'}, got {v}.")
    return v


def _int(lo: int, hi: int | None = None) -> Any:
    """An integer field within [lo, hi]."""
    return Annotated[int, AfterValidator(lambda v, info: _in_range(info.field_name, v, lo, hi))]


def _refused(message: str, *allowed: Any) -> Any:
    """A field for an OpenAI feature meshlm does not implement: only its no-op values pass."""

    def check(v: Any) -> Any:
        if not any(v == a for a in allowed):
            raise _fail(message, "unsupported")
        return v

    return Annotated[Any, AfterValidator(check)]


def _outside_vocab(ids: list[int], name: str, vocab: int) -> str | None:
    """The message for the first token id outside [0, vocab), or None."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    return None if bad is None else f"token id {bad} in {name} is outside the vocabulary [0, {vocab})."


class _Body(BaseModel):
    """Strict JSON types; null means unset; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Body):
    """stream_options: whether the last chunk carries usage."""

    include_usage: bool = False


class TextPart(_Body):
    """A text part of a message's content (the only kind served)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One chat message; an assistant's content may be absent."""

    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None and info.data.get("role") != "assistant":
            raise _fail("content is required")  # reported as messages[i].content must be a string
        return v

    @property
    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Generation(_Body):
    """Fields common to /v1/completions and /v1/chat/completions (checked in this order, then the endpoint's)."""

    model: str
    presence_penalty: _refused("presence_penalty is not supported; leave it unset or 0.", 0) = None
    frequency_penalty: _refused("frequency_penalty is not supported; leave it unset or 0.", 0) = None
    logit_bias: _refused("logit_bias is not supported; leave it unset.", {}) = None
    n: int = 1
    best_of: _int(1) | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: _int(-1) = 0
    seed: _int(-(2**63), 2**64 - 1) | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] = ()
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    timeout: _refused("timeout is not a body field; send the X-Request-Timeout header (seconds).") = None
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()
    user: str | None = None
    max_tokens: _int(1) | None = None

    @field_validator("model")
    @classmethod
    def _served(cls, v: str, info: ValidationInfo) -> str:
        names = info.context.names
        if v not in names:
            raise _fail(f"The model {v!r} does not exist; this server serves {', '.join(sorted(names))}.",
                        "model_not_found")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int, info: ValidationInfo) -> int:
        return _in_range("n", v, 1, info.context.max_n)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int, info: ValidationInfo) -> int:
        if v != info.data.get("n", v):
            raise _fail("best_of other than n is not supported; leave it unset.", "unsupported")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not 0.0 <= v <= 2.0:
            raise _fail(f"temperature must be between 0 and 2, got {v}.")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise _fail(f"top_p must be in (0, 1], got {v}; use 1 to disable nucleus sampling.")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str]) -> tuple[str, ...]:
        stops = (v,) if isinstance(v, str) else tuple(v)
        if "" in stops:
            raise _fail("stop strings must be non-empty; remove the empty string from stop.")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int], info: ValidationInfo) -> list[int]:
        if msg := _outside_vocab(v, "stop_token_ids", info.context.vocab_size):
            raise _fail(msg, "invalid_token_id")
        return v


class CompletionRequest(_Generation):
    """A /v1/completions body."""

    prompt: str | list[int] | list[str | list[int]]
    logprobs: _int(0, MAX_LOGPROBS) | None = None
    echo: _refused("echo is not supported; leave it unset or false.", False) = None
    suffix: _refused("suffix is not supported; leave it unset.") = None

    def prompt_ids(self, ctx: ModelContext) -> list[list[int]]:
        """Token ids of each prompt (text is encoded); 400 for an empty prompt or an id outside the vocabulary."""
        p = self.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        if not items:
            raise invalid("prompt is empty; send at least one token of text.", "prompt", "empty_prompt")
        out = []
        for item in items:
            ids = ctx.encode(item) if isinstance(item, str) else list(item)
            if msg := _outside_vocab(ids, "prompt", ctx.vocab_size):
                raise invalid(msg, "prompt", "invalid_token_id")
            if not ids:
                raise invalid("prompt is empty; send at least one token of text.", "prompt", "empty_prompt")
            out.append(ids)
        return out

    def limit(self) -> tuple[str, int | None]:
        """The field that caps new tokens, and its value."""
        return "max_tokens", self.max_tokens

    def num_logprobs(self) -> int | None:
        """Top alternatives per token, or None for no logprobs."""
        return self.logprobs


class ChatCompletionRequest(_Generation):
    """A /v1/chat/completions body."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: _int(0, MAX_LOGPROBS) | None = None
    max_completion_tokens: _int(1) | None = None
    tools: _refused("tool calling is not supported; send no tools.", []) = None
    functions: _refused("tool calling is not supported; send no tools.", []) = None
    response_format: _refused('response_format other than {"type": "text"} is not supported.',
                              {"type": "text"}) = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise _fail(MESSAGES, "empty_prompt")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int, info: ValidationInfo) -> int:
        if not info.data.get("logprobs"):
            raise _fail("top_logprobs needs logprobs set to true.")
        return v

    def prompt_ids(self, ctx: ModelContext) -> list[list[int]]:
        """The messages rendered by the chat template, as token ids."""
        try:
            ids = ctx.encode_chat([{"role": m.role, "content": m.text} for m in self.messages])
        except MeshlmError as e:
            raise invalid(str(e), "messages") from None
        if not ids:
            raise invalid("messages render to an empty prompt; send some content.", "messages", "empty_prompt")
        return [ids]

    def limit(self) -> tuple[str, int | None]:
        """The field that caps new tokens (max_completion_tokens over max_tokens), and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def num_logprobs(self) -> int | None:
        """Top alternatives per token, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None
