"""A request's state: tokens, computed tokens, block table, status, deadline; and its public output."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from meshlm.config import SamplingParams


class Status(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """What a caller sees of a request (filled in as it runs)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "timeout"
    logprobs: list[TokenLogprob] | None = None
    ttft_s: float = 0.0  # arrival -> first token
    decode_s: float = 0.0  # first token -> last token
    queue_s: float = 0.0  # arrival -> first scheduled
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        """True once a finish_reason is set."""
        return self.finish_reason is not None

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one per second of decode."""
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass(eq=False)  # identity: the scheduler's queues hold and remove requests by identity, in O(1) compares
class Request:
    """Scheduler-side state. Invariant: num_computed <= num_scheduled <= len(tokens); KV of
    tokens[:num_computed] is cached, tokens[num_computed:num_scheduled] are in steps still in flight."""

    id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_tokens clipped to the context window
    arrival: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time after which the request times out
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0
    num_scheduled: int = 0
    chunk_ends: tuple[int, ...] = ()  # pp > 1: where the chunks of the current prefill end
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    status: Status = Status.WAITING
    draft: tuple[int, ...] = ()  # proposed next tokens for the coming step (engine sets, scheduler takes)
    first_scheduled: float | None = None
    first_token: float | None = None
    out: RequestOutput | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)
        if self.out is None:
            self.out = RequestOutput(self.id, list(self.prompt),
                                     logprobs=[] if self.params.logprobs is not None else None)

    @property
    def num_generated(self) -> int:
        """Tokens produced so far."""
        return len(self.tokens) - len(self.prompt)

    @property
    def in_flight(self) -> bool:
        """True while some of its tokens are in a step not yet collected."""
        return self.num_scheduled > self.num_computed

    @property
    def remaining_prefill(self) -> int:
        """Tokens known but not yet scheduled (prompt chunks, or a recomputation after preemption)."""
        return len(self.tokens) - self.num_scheduled

    def next_grant(self, budget: int) -> int:
        """Tokens to schedule next: up to the end of the current prompt chunk (or all owed), within budget."""
        end = next((e for e in self.chunk_ends if e > self.num_scheduled), len(self.tokens))
        return min(end - self.num_scheduled, budget)
