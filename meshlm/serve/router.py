"""The router: dp replicas (serve/fleet.py) behind the interface the HTTP layer uses (submit, abort).

Every engine request is a `Routed` record kept here, not on a replica: its prompt, the tokens and text
the client already has, its deadline. A replica that fails (its process exits, it reports a failed rank,
or its heartbeats show no progress for `stall_s`, serve/routing.py) stops being routed to at once; its
records move to healthy replicas as prompt + tokens already sent (engine Resume), with the remaining
budget and the original deadline, so the client's stream continues with no token repeated or missing.
Meanwhile the failed replica is killed whole, restarted in the background once its circuit breaker's
cooldown ends, probed with a 1-token request, and readmitted. With no routable replica, new requests
fail fast (503 + Retry-After) and moved ones wait for a readmission up to their deadline and
`failover_wait_s`. With exit_on_failure, a failure instead ends the server (exit 1), as a supervisor
that restarts whole servers wants.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from meshlm.config import SamplingParams
from meshlm.engine.engine import Resume
from meshlm.engine.scheduler import QueueFull
from meshlm.errors import RequestError
from meshlm.serve.engine_loop import Abort, EngineUnavailable, Snapshot
from meshlm.serve.fleet import Fleet, Replica, ReplicaLost, RouterConfig
from meshlm.serve.protocol import Update
from meshlm.serve.replica import Outs, ReplicaSpec, Work
from meshlm.serve.routing import affinity_key, pick, retry_delay
from meshlm.serve.totals import sum_snapshots

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Routed:
    """One engine request as the router keeps it (the client's view: survives any replica)."""

    id: str
    choice: int
    prompt: tuple[int, ...]
    params: SamplingParams
    out: asyncio.Queue
    deadline: float | None  # time.monotonic() after which it times out (None: no limit)
    internal: bool = False
    token_ids: list[int] = field(default_factory=list)  # generated and sent to the client
    text: str = ""
    replica: int | None = None
    attempts: int = 0  # replicas it was lost on
    accepted: bool = False
    done: bool = False

    def outstanding(self) -> int:
        """Tokens its replica still owes: the prompt until the first token, then the rest of the budget."""
        return (0 if self.token_ids else len(self.prompt)) + max(0, self.params.max_tokens - len(self.token_ids))


class Router(Fleet):
    """Submits, aborts and migrates engine requests over the replicas (their life: Fleet)."""

    def __init__(self, spec: ReplicaSpec, cfg: RouterConfig, probe_token: int = 0,
                 on_fatal: Callable[[str], None] = lambda msg: None, observe: Callable[..., None] = lambda *a: None,
                 on_finish: Callable[[Any, str], None] = lambda stats, reason: None) -> None:
        super().__init__(spec, cfg, on_fatal, observe)
        self.probe_token = probe_token
        self.on_finish = on_finish  # on_finish(FinalStats | None, reason) per client request that ends
        self.records: dict[str, Routed] = {}
        self.pending = 0  # submits not yet acknowledged
        self.migrated = self.lost = 0
        self.rng = random.Random()
        self._ids = itertools.count()
        self._keys = itertools.count()

    # ---- replicas' events --------------------------------------------------------------------------------

    def _evacuate(self, r: Replica, move: bool) -> None:
        """Take r's accepted requests off it: move each to another replica, or fail it."""
        recs = [rec for rec in r.records.values() if rec.accepted]
        r.records.clear()
        for rec in recs:
            rec.replica = None
            if move:
                self._spawn(self._migrate(rec))
            else:
                self._finish(rec, "error", f"The engine failed: {r.reason}")

    async def _probe(self, r: Replica) -> bool:
        out: asyncio.Queue[Update] = asyncio.Queue()
        rec = Routed(f"probe-{r.index}-{next(self._ids)}", 0, (self.probe_token,),
                     SamplingParams(max_tokens=1, ignore_eos=True), out, None, internal=True)
        try:
            await asyncio.wait_for(self._send(r, [rec], probing=True), self.cfg.probe_timeout_s)
            u = await asyncio.wait_for(out.get(), self.cfg.probe_timeout_s)
            return u.finish_reason in ("stop", "length")
        except (TimeoutError, ReplicaLost, QueueFull, RequestError, EngineUnavailable):
            return False
        finally:
            self._forget(rec)

    def _on_outs(self, r: Replica, msg: Outs) -> None:
        for rid, u in msg.updates:
            rec = r.records.get(rid)
            if rec is None:
                continue
            if u.finish_reason == "error":  # the replica's engine failed: this request moves
                self._fail(r, u.error or "the engine failed")
                return
            rec.token_ids.extend(u.token_ids)
            if u.finish_reason in (None, "stop", "length"):
                rec.text = u.text
            if u.finish_reason is not None:
                self._forget(rec)
                if not rec.internal:
                    self.on_finish(u.stats, u.finish_reason)
            rec.out.put_nowait(replace(u, choice=rec.choice))

    # ---- requests ----------------------------------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh number for request ids."""
        return next(self._ids)

    async def submit(self, request_ids: list[str], prompts: list[list[int]], params: list[SamplingParams],
                     out: asyncio.Queue, timeout_s: float | None, internal: bool = False,
                     deadline: float | None = None) -> None:
        """Route engine requests (all to one replica); raises QueueFull, RequestError or EngineUnavailable.

        deadline: an absolute time.monotonic() limit set at arrival (else now + timeout_s); it bounds
        the request's run on every replica it moves to."""
        if deadline is None and timeout_s is not None:
            deadline = time.monotonic() + timeout_s
        recs = [Routed(rid, i, tuple(p), sp, out, deadline, internal)
                for i, (rid, p, sp) in enumerate(zip(request_ids, prompts, params))]
        tried: set[int] = set()
        last: Exception | None = None
        self.pending += 1
        try:
            while True:
                r = self._pick(recs[0].prompt, tried)
                if r is None:
                    raise last if isinstance(last, QueueFull) else EngineUnavailable(self.unavailable() or "")
                try:
                    await self._send(r, recs)
                    return
                except (QueueFull, ReplicaLost) as e:
                    tried.add(r.index)
                    last = e
        finally:
            self.pending -= 1

    def _pick(self, prompt: tuple[int, ...], exclude: set[int]) -> Replica | None:
        views = [replace(r.view(), routable=False) if r.index in exclude else r.view() for r in self.replicas]
        block = next((r.info.block_size for r in self.replicas if r.info is not None), 16)
        i = pick(views, affinity_key(prompt, block), self.cfg.affinity_slack_tokens)
        return None if i is None else self.replicas[i]

    async def _send(self, r: Replica, recs: list[Routed], probing: bool = False) -> None:
        """Hand recs to replica r and wait for its answer; raises its refusal, or ReplicaLost."""
        if r.state != "healthy" and not probing:
            raise ReplicaLost(f"replica {r.index} is {r.state}")
        key = next(self._keys)
        fut = r.acks[key] = self.loop.create_future()
        for rec in recs:
            rec.replica, rec.accepted = r.index, False
            r.records[rec.id] = rec
            self.records[rec.id] = rec
        left = None
        if recs[0].deadline is not None:
            left = recs[0].deadline - time.monotonic()
            if left <= 0:
                for rec in recs:
                    self._forget(rec)
                raise EngineUnavailable("the request's deadline passed before it could be placed")
        resume = tuple(Resume(tuple(rec.token_ids), rec.text) for rec in recs) if recs[0].token_ids else None
        r.proc.send(Work(key, tuple(rec.id for rec in recs), tuple(rec.prompt for rec in recs),
                         tuple(rec.params for rec in recs), left, recs[0].internal, resume))
        try:
            await fut
        except BaseException:
            r.acks.pop(key, None)
            for rec in recs:
                if rec.replica == r.index and not rec.done:
                    r.records.pop(rec.id, None)
                    rec.replica = None
            r.proc.send(Abort([rec.id for rec in recs]))  # cancelled after all: it may still have been added
            raise
        for rec in recs:
            rec.accepted = True

    async def _migrate(self, rec: Routed) -> None:
        """Move rec to another replica: bounded attempts, jittered pauses, never past its deadline."""
        self.migrated += 1
        while not rec.done:
            rec.attempts += 1
            delay = retry_delay(self.cfg.retry, rec.attempts, time.monotonic(), rec.deadline, self.rng)
            if delay is None:
                timed_out = rec.deadline is not None and time.monotonic() >= rec.deadline - 1e-3
                return self._give_up(rec, "timeout" if timed_out else "error",
                                     f"lost on {rec.attempts - 1} replica(s); no more retries")
            await asyncio.sleep(delay)
            r = await self._wait_routable(rec)
            if rec.done:
                return
            if r is None:
                return self._give_up(rec, "error", "no healthy replica took it in time")
            try:
                await self._send(r, [rec])
                log.info("request %s moved to replica %d after %d token(s)", rec.id, r.index, len(rec.token_ids))
                return
            except (QueueFull, ReplicaLost, EngineUnavailable):
                continue
            except RequestError as e:
                return self._give_up(rec, "error", str(e))

    async def _wait_routable(self, rec: Routed) -> Replica | None:
        until = time.monotonic() + self.cfg.failover_wait_s
        if rec.deadline is not None:
            until = min(until, rec.deadline)
        while not rec.done and time.monotonic() < until:
            r = self._pick(rec.prompt, set())
            if r is not None:
                return r
            await asyncio.sleep(0.05)
        return None

    def _give_up(self, rec: Routed, reason: str, why: str) -> None:
        self.lost += 1
        log.error("request %s failed: %s", rec.id, why)
        self._finish(rec, reason, why)

    def _finish(self, rec: Routed, reason: str, error: str | None = None) -> None:
        self._forget(rec)
        if not rec.internal:
            self.on_finish(None, reason)
        rec.out.put_nowait(Update(rec.choice, "", finish_reason=reason, error=error))

    def _forget(self, rec: Routed) -> None:
        rec.done = True
        self.records.pop(rec.id, None)
        if rec.replica is not None:
            self.replicas[rec.replica].records.pop(rec.id, None)

    def abort(self, request_ids: list[str] | None) -> None:
        """Abort engine requests (unknown or finished ids are ignored), or every request for None."""
        recs = list(self.records.values()) if request_ids is None else [
            self.records[i] for i in request_ids if i in self.records]
        by_replica: dict[int, list[str]] = {}
        for rec in recs:
            if rec.replica is not None:
                by_replica.setdefault(rec.replica, []).append(rec.id)
            self._finish(rec, "abort")
        for i, ids in by_replica.items():
            r = self.replicas[i]
            if r.proc is not None and r.state == "healthy":
                r.proc.send(Abort(ids))

    # ---- what the HTTP layer reads -----------------------------------------------------------------------

    def unavailable(self) -> str | None:
        """Why no request can be placed now, or None while some replica is routable."""
        if any(r.routable for r in self.replicas):
            return None
        why = "; ".join(f"{r.reason or f'replica {r.index} is {r.state}'}" for r in self.replicas)
        return f"No healthy replica ({why})" + ("." if self.cfg.exit_on_failure else "; restarting.")

    def health(self) -> list[dict[str, Any]]:
        """Every replica's /health entry."""
        return [r.health() for r in self.replicas]

    @property
    def max_waiting_each(self) -> int:
        """The largest queue of a routable replica: a request's choices all go to one replica."""
        return max((r.info.max_waiting for r in self.replicas if r.routable), default=0)

    @property
    def snapshot(self) -> Snapshot:
        """The replicas' latest figures, summed (queue caps of routable replicas only; serve/totals.py)."""
        return sum_snapshots([r.snapshot for r in self.replicas],
                             sum(r.info.max_waiting for r in self.replicas if r.routable))
