"""The engine's side of speculative decoding: ask the proposer, hold its proposals, count acceptance.

Each step, before scheduling, `propose` picks the running requests that are decoding (every known token
but the last computed, nothing in flight), caps each one's length so the step can't pass max_tokens, asks the
policy for each request's k and sets req.draft; the scheduler grants the last token plus the draft under the
token budget. After the step the engine verifies (engine/verify.py) with `q(item)`, the proposer's
distribution for the tokens actually granted, and reports the outcome with `record`.

A seeded sampled request always proposes the configured k (capped by max_tokens), never the policy's choice:
rejection sampling's outcome at a position depends on whether a proposal was made there, so only a k that
does not depend on measured timings makes a seed reproduce (docs/speculative.md). Greedy requests are exact
at any k and unseeded ones have nothing to reproduce: the policy chooses for them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from meshlm.engine.request import Status
from meshlm.engine.scheduler import Scheduled, Scheduler
from meshlm.engine.spec_policy import SpecCounters, SpecPolicy
from meshlm.engine.speculative import Proposer, SpeculativeConfig


class Speculator:
    """Proposer + policy + counters of one engine (driver side)."""

    def __init__(self, proposer: Proposer, cfg: SpeculativeConfig) -> None:
        self.proposer, self.cfg = proposer, cfg
        self.policy = SpecPolicy(cfg.num_tokens, cfg.adaptive)
        self.counters = SpecCounters()
        self.probs: dict[str, torch.Tensor] = {}  # request id -> [len(draft), V] of its pending proposal
        self.last_done: float | None = None  # perf_counter of the previous step's end in this busy period
        self.propose_seconds = 0.0  # every call, catch-ups included
        self.catch_up_seconds = 0.0  # of those, calls left out of the policy's per-token proposer cost
        self.pending = 0.0  # proposer seconds since the last step ended: not the target's time

    def propose(self, scheduler: Scheduler, depth: int) -> None:
        """Set req.draft on the decoding requests of the coming step (its share of the running requests)."""
        running = scheduler.running
        seats = -(-(len(running) + len(scheduler.waiting)) // depth)  # as Scheduler.schedule counts them
        for r in running:
            r.draft = ()  # a proposal the scheduler didn't reach last step: the policy decides afresh
        reqs = [r for r in running if r.status is Status.RUNNING and not r.in_flight
                and r.num_computed == len(r.tokens) - 1 and r.num_generated < r.max_new - 1][:seats]
        if not reqs:
            return
        caps = [min(self.cfg.num_tokens, r.max_new - r.num_generated - 1) for r in reqs]
        fixed = [not r.params.greedy and r.params.seed is not None for r in reqs]
        ks = self.policy.choose([r.id for r in reqs], caps, fixed, backlog=[self.proposer.backlog(r) for r in reqs],
                                left=[r.max_new - r.num_generated for r in reqs])
        asked = [(r, k) for r, k in zip(reqs, ks) if k > 0]
        if not asked:
            return
        t0 = time.perf_counter()
        proposals = self.proposer.propose([r for r, _ in asked], [k for _, k in asked])
        seconds = time.perf_counter() - t0
        self.propose_seconds += seconds
        self.pending += seconds
        fed = sum(p.fed for p in proposals if self.policy.is_catch_up(p.fed))  # prompts' first passes
        if fed:  # not per-token cost: the proposals' own share (as fitted) aside, the catch-up's
            self.catch_up_seconds += seconds
            c, d = self.policy.proposer_cost()
            self.policy.observe_catch_up(fed, max(seconds - c - d * sum(k for _, k in asked), 0.0))
        else:
            self.policy.observe_propose(sum(k for _, k in asked), seconds)
        for (r, n), p in zip(asked, proposals):
            r.draft = tuple(p.tokens[:n])
            if p.probs is not None and r.draft:
                self.probs[r.id] = p.probs
            else:
                self.probs.pop(r.id, None)

    def q(self, item: Scheduled) -> torch.Tensor | None:
        """The proposer's distribution [len(item.draft), V] for the granted draft, None when one-hot."""
        probs = self.probs.pop(item.req.id, None)
        return None if probs is None else probs[:len(item.draft)].float().cpu()  # verification runs on the CPU

    def record(self, item: Scheduled, accepted: int) -> None:
        """A verification of item's draft kept `accepted` tokens."""
        self.counters.record(len(item.draft), accepted)
        self.policy.observe_verify(item.req.id, len(item.draft), accepted)

    def step_done(self, tokens: Sequence[int] | None, busy: bool) -> None:
        """A step finished; busy=False when the engine goes idle (the interval until the next is no step).

        tokens: the token counts of the finished step and of the steps still in flight (pp > 1), None unless
        all are decode steps (every grant one known token, with or without proposals): only those feed the cost
        fit, since prefills cost otherwise per token. At pp > 1 the interval between step ends holds the first
        stage's work on a step submitted in it and the wait for the last stage's on the finished one, so the
        sample's size is the mean over the steps in flight. The proposer's seconds in the interval are its own
        cost term, not the target's."""
        now = time.perf_counter()
        if self.last_done is not None and tokens:
            self.policy.observe_step(sum(tokens) / len(tokens), max(now - self.last_done - self.pending, 0.0))
        self.pending = 0.0
        self.last_done = now if busy else None

    def release(self, request_id: str) -> None:
        """The request ended or was preempted: drop its pending proposal and the proposer's state."""
        self.probs.pop(request_id, None)
        self.proposer.release(request_id)
        self.policy.release(request_id)
