"""Continuous batching over a token budget: each step grants each request some new tokens.

One rule covers prefill, chunked prefill, decode and prefix hits: a request's tokens past
`num_computed` are owed; the step grants min(owed, budget left). Running requests go first (in
admission order); when KV blocks run out the most recently admitted running request is preempted
(blocks freed, recomputed later). Waiting requests are admitted while budget, seat and blocks allow.

With pipeline parallelism several steps are in flight. A step takes at most a 1/depth share of the live
requests, so the running requests split into about `depth` groups, one per step in flight. A request with
tokens in flight is never preempted and gets no grant, except the next chunk of a prompt: with a
`chunk_plan` (pp > 1) a prefill is cut into chunks of equal estimated cost (parallel/pipeline.py) that
flow down the stages back to back, chunk k + 1 on stage 0 while chunk k is on stage 1. That is exact
for causal attention: every stage runs steps in order, so chunk k + 1 finds chunk k's KV; only the last
chunk samples.

Speculative decoding (engine/speculative.py): a decoding request may carry proposed tokens (req.draft);
its grant is then its last known token plus up to budget - 1 of them, all counted under the budget (vLLM
v1's rule). Speculation never preempts: when the blocks for the proposals aren't free the request decodes
one token. After verification `computed(item, accepted)` keeps the KV of the accepted proposals only and
frees whole blocks past it (BlockManager.truncate); prefix hashes cover accepted tokens only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshlm.engine.kv_cache import BlockManager
from meshlm.engine.request import Request, Status
from meshlm.errors import MeshlmError, RequestError


class QueueFull(MeshlmError):
    """The waiting queue is at its cap; retry later."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Caps on one step and on the queues."""

    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 2048  # tokens computed per step
    max_waiting: int = 1024  # queued requests before add() refuses

    def __post_init__(self) -> None:
        from meshlm.errors import ConfigError

        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_waiting < 1:
            raise ConfigError("max_num_seqs, max_num_batched_tokens and max_waiting must be >= 1 (every request "
                              "queues before it runs: max_waiting 0 would refuse them all).")


@dataclass
class Scheduled:
    """One request's grant in a step: compute tokens[start : start + num_new], then the proposed draft."""

    req: Request
    start: int
    num_new: int
    draft: tuple[int, ...] = ()  # proposals after the last known token (only when samples)

    @property
    def num_tokens(self) -> int:
        """Tokens this grant computes: known ones plus proposals."""
        return self.num_new + len(self.draft)

    @property
    def samples(self) -> bool:
        """True when this grant reaches the last known token, so a new token is sampled."""
        return self.start + self.num_new == len(self.req.tokens)


@dataclass
class SchedulerOutput:
    """A step's plan."""

    items: list[Scheduled] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    timed_out: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens computed this step."""
        return sum(i.num_new for i in self.items)


class Scheduler:
    """Two queues (waiting, running) over a BlockManager."""

    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager,
                 chunk_plan: Callable[[int, int], tuple[int, ...]] | None = None) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.chunk_plan = chunk_plan  # (first, stop) of a prefill -> where its chunks end; None: one piece
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Queue a request, or refuse it at once (too large for the whole pool, or queue full)."""
        need = self.blocks.blocks_for(len(req.prompt) + req.max_new)
        if need > self.blocks.num_blocks:
            raise RequestError(
                f"The request needs {len(req.prompt) + req.max_new} tokens of KV cache but the whole pool "
                f"holds {self.blocks.num_blocks * self.blocks.block_size}; lower max_tokens, shorten the "
                "prompt, or give the cache more memory (--kv-cache-mb)."
            )
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the cap); retry shortly.")
        self.waiting.append(req)

    def has_work(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """End a request (done, aborted, timed out) and free its blocks."""
        if req.status is Status.FINISHED:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req.block_table)
        req.num_scheduled = req.num_computed  # a step still in flight comes back to nothing
        req.status = Status.FINISHED
        req.out.finish_reason = reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.release(req.block_table)
        req.num_computed = req.num_scheduled = 0
        req.chunk_ends = ()
        req.draft = ()
        req.num_hashed_blocks = 0
        req.status = Status.WAITING
        req.out.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _grow(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Blocks for req's next n tokens, preempting the latest admitted requests not in flight; False if none."""
        while not self.blocks.grow(req.block_table, req.num_scheduled + n):
            victim = next((r for r in reversed(self.running) if not r.in_flight), None)  # req itself at the latest
            if victim is None:
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def schedule(self, depth: int = 1) -> SchedulerOutput:
        """Plan one step while up to depth - 1 others are in flight."""
        out = SchedulerOutput()
        now = time.perf_counter()
        for req in [r for r in (*self.running, *self.waiting) if r.deadline is not None and now > r.deadline]:
            self.finish(req, "timeout")
            out.timed_out.append(req)
        budget = self.cfg.max_num_batched_tokens
        seats = -(-(len(self.running) + len(self.waiting)) // depth)  # this step's share of live requests
        for req in list(self.running):
            if budget == 0 or len(out.items) == seats:
                break
            # Preempted just below, or every known token already in a step (its next token is on its way).
            if req.status is not Status.RUNNING or req.remaining_prefill == 0:
                continue
            n = req.next_grant(budget)
            draft, req.draft = (req.draft[:budget - n] if n == req.remaining_prefill == 1 else ()), ()
            if draft and not self.blocks.grow(req.block_table, req.num_scheduled + n + len(draft)):
                draft = ()  # speculation never preempts: decode one token
            if not self._grow(req, n, out):
                continue
            out.items.append(Scheduled(req, req.num_scheduled, n, draft))
            req.num_scheduled += n
            budget -= n + len(draft)
        while (self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs
               and len(out.items) < seats and not out.preempted):
            req = self.waiting[0]
            cached = self.blocks.match_prefix(req.tokens)
            computed = len(cached) * self.blocks.block_size
            ends = self.chunk_plan(computed, len(req.tokens)) if self.chunk_plan else ()
            n = min((ends[0] if ends else len(req.tokens)) - computed, budget)
            if not self.blocks.allocate(req.block_table, cached, computed + n):
                break
            self.waiting.popleft()
            req.num_computed, req.num_scheduled, req.chunk_ends = computed, computed + n, ends
            req.num_hashed_blocks = len(cached)
            req.status = Status.RUNNING
            if req.first_scheduled is None:  # not a readmission after preemption
                req.first_scheduled = now
                req.out.queue_s = now - req.arrival
                req.out.num_cached_tokens = computed  # prompt tokens only: a recomputation is no prompt hit
            self.running.append(req)
            out.items.append(Scheduled(req, computed, n))
            budget -= n
        return out

    def computed(self, item: Scheduled, accepted: int = 0) -> None:
        """Mark a grant's tokens computed (and `accepted` of its proposals, already appended to req.tokens),
        drop the KV of rejected proposals, and publish newly full blocks to the prefix cache."""
        req = item.req
        req.num_computed = item.start + item.num_new + accepted
        if item.draft:  # nothing else of req was in flight: a request with a step in flight gets no grant
            req.num_scheduled = req.num_computed
            self.blocks.truncate(req.block_table, req.num_computed)
        full = req.num_computed // self.blocks.block_size
        if full > req.num_hashed_blocks:
            self.blocks.register_full(req.block_table, req.tokens, req.num_hashed_blocks, full)
            req.num_hashed_blocks = full
