"""The engine's side of speculative decoding: ask the proposer, hold its proposals, count acceptance.

Each step, before scheduling, `propose` picks the running requests that are decoding (every known token
but the last computed, nothing in flight), asks the policy for a length k, caps it per request so the step
can't pass max_tokens, and sets req.draft; the scheduler grants the last token plus the draft under the
token budget. After the step the engine verifies (engine/verify.py) with `q(item)`, the proposer's
distribution for the tokens actually granted, and reports the outcome with `record`.
"""

from __future__ import annotations

import time

import torch

from meshlm.engine.paged_attention import StepInput
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
        self.propose_seconds = 0.0

    def propose(self, scheduler: Scheduler, depth: int) -> None:
        """Set req.draft on the decoding requests of the coming step (its share of the running requests)."""
        running = scheduler.running
        seats = -(-(len(running) + len(scheduler.waiting)) // depth)  # as Scheduler.schedule counts them
        for r in running:
            r.draft = ()  # a proposal the scheduler didn't reach last step: the policy decides afresh
        reqs = [r for r in running if r.status is Status.RUNNING and not r.in_flight
                and r.num_computed == len(r.tokens) - 1 and r.num_generated < r.max_new - 1][:seats]
        k = self.policy.choose_k(len(reqs)) if reqs else 0
        if k == 0:
            return
        t0 = time.perf_counter()
        ks = [min(k, r.max_new - r.num_generated - 1) for r in reqs]
        for r, n, p in zip(reqs, ks, self.proposer.propose(reqs, ks)):
            r.draft = tuple(p.tokens[:n])
            if p.probs is not None and r.draft:
                self.probs[r.id] = p.probs
            else:
                self.probs.pop(r.id, None)
        self.propose_seconds += time.perf_counter() - t0

    def q(self, item: Scheduled) -> torch.Tensor | None:
        """The proposer's distribution [len(item.draft), V] for the granted draft, None when one-hot."""
        probs = self.probs.pop(item.req.id, None)
        return None if probs is None else probs[:len(item.draft)].float().cpu()  # verification runs on the CPU

    def record(self, item: Scheduled, accepted: int) -> None:
        """A verification of item's draft kept `accepted` tokens."""
        self.counters.record(len(item.draft), accepted)
        self.policy.observe_verify(len(item.draft), accepted)

    def step_done(self, step: StepInput, decode: bool, busy: bool) -> None:
        """A step finished; busy=False when the engine goes idle (the interval until the next is no step).

        Only decode steps (every grant one known token, with or without proposals) feed the cost fit: the
        policy weighs decode steps with and without proposals, and prefills cost otherwise per token."""
        now = time.perf_counter()
        if self.last_done is not None and decode:
            self.policy.observe_step(len(step.token_ids), now - self.last_done)
        self.last_done = now if busy else None

    def release(self, request_id: str) -> None:
        """The request ended or was preempted: drop its pending proposal and the proposer's state."""
        self.probs.pop(request_id, None)
        self.proposer.release(request_id)
