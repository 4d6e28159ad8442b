"""The router: dp replicas (serve/replica.py) behind the interface the HTTP layer uses (submit, abort).

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
from meshlm.engine.engine import EngineStats, Resume
from meshlm.engine.scheduler import QueueFull
from meshlm.errors import RequestError
from meshlm.serve.engine_loop import Abort, EngineUnavailable, Snapshot
from meshlm.serve.links import Link, LocalReplica, RemoteReplica, ReplicaListener
from meshlm.serve.protocol import Update
from meshlm.serve.replica import Accepted, Exited, Failed, Heartbeat, Outs, Ready, ReplicaSpec, Work
from meshlm.serve.routing import (
    Beat,
    CircuitBreaker,
    ReplicaView,
    RetryPolicy,
    affinity_key,
    pick,
    retry_delay,
    stalled,
)

log = logging.getLogger(__name__)


class ReplicaLost(Exception):
    """The replica failed before it acknowledged the work sent to it."""


@dataclass(frozen=True)
class RouterConfig:
    """dp, detection, retries and recovery."""

    dp: int = 1
    remote: int = 0  # of the dp replicas, how many connect from other hosts (`meshlm replica`)
    listen: tuple[str, int] | None = None  # where remote replicas connect
    key: bytes = field(default=b"", repr=False)  # their shared secret
    stall_s: float = 1.5  # a replica silent or stuck in one engine call this long has failed
    affinity_slack_tokens: int = 2048  # prefix affinity yields to the least busy replica beyond this
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    failover_wait_s: float = 120.0  # a moved request waits this long at most for a routable replica
    start_timeout_s: float = 600.0  # loading a replica
    probe_timeout_s: float = 10.0  # the readmission probe
    exit_on_failure: bool = False


@dataclass(eq=False)
class Routed:
    """One engine request as the router keeps it (the client's view: survives any replica)."""

    id: str
    choice: int
    prompt: tuple[int, ...]
    params: SamplingParams
    out: asyncio.Queue
    deadline: float | None  # time.perf_counter() after which it times out (None: no limit)
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


class Replica:
    """The router's state of one replica slot (its process changes with each restart)."""

    def __init__(self, index: int, remote: bool = False) -> None:
        self.index, self.remote = index, remote
        self.proc: Link | None = None
        self.state = "waiting" if remote else "starting"  # waiting (remote) | starting | healthy | failed | stopped
        self.reason: str | None = None
        self.breaker = CircuitBreaker()
        self.info: Ready | None = None
        self.ready: asyncio.Future | None = None
        self.beat: Beat | None = None
        self.beat_at = 0.0  # monotonic time the last heartbeat arrived
        self.snapshot = Snapshot()
        self.records: dict[str, Routed] = {}
        self.acks: dict[int, asyncio.Future] = {}
        self.failed_at = 0.0
        self.failures = self.restarts = 0
        self.detect_s = self.recover_s = 0.0

    @property
    def routable(self) -> bool:
        """Healthy with a closed circuit."""
        return self.state == "healthy" and self.breaker.closed

    def view(self) -> ReplicaView:
        """What pick() sees."""
        return ReplicaView(self.index, self.routable, sum(r.outstanding() for r in self.records.values()))

    def health(self) -> dict[str, Any]:
        """This replica's /health entry."""
        entry: dict[str, Any] = {"replica": self.index, "state": self.state, "circuit": self.breaker.state,
                                 "pid": self.proc.pid if self.proc else None, "requests": len(self.records)}
        if self.remote:
            entry["host"] = self.proc.host if self.proc else None
        if self.reason and self.state != "healthy":
            entry["reason"] = self.reason
        return entry


class Router:
    """Submits, aborts and migrates engine requests over dp replicas; detects, kills and restarts them."""

    def __init__(self, spec: ReplicaSpec, cfg: RouterConfig, probe_token: int = 0,
                 on_fatal: Callable[[str], None] = lambda msg: None, observe: Callable[..., None] = lambda *a: None,
                 on_finish: Callable[[Any, str], None] = lambda stats, reason: None) -> None:
        self.spec, self.cfg, self.probe_token = spec, cfg, probe_token
        self.on_fatal, self.observe = on_fatal, observe  # observe("detect" | "recover", replica, seconds)
        self.on_finish = on_finish  # on_finish(FinalStats | None, reason) per client request that ends
        self.replicas = [Replica(i, remote=i >= cfg.dp - cfg.remote) for i in range(cfg.dp)]
        self.listener: ReplicaListener | None = None
        self.records: dict[str, Routed] = {}
        self.pending = 0  # submits not yet acknowledged
        self.migrated = self.lost = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.rng = random.Random()
        self._ids = itertools.count()
        self._keys = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> Ready:
        """Start every replica and probe it; raises EngineUnavailable naming the first that cannot load."""
        self.loop = asyncio.get_running_loop()
        if self.cfg.remote:
            self.listener = ReplicaListener(self.cfg.listen, self.cfg.key, self._connected)
        results = await asyncio.gather(*(self._launch(r) for r in self.replicas if not r.remote))
        bad = next((why for why in results if why is not None), None)
        if bad is not None:
            raise EngineUnavailable(bad)
        self._spawn(self._monitor())
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while not any(r.routable for r in self.replicas):  # only remote replicas: wait for the first
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"no replica connected within {self.cfg.start_timeout_s:g} s")
            await asyncio.sleep(0.1)
        infos = [r.info for r in self.replicas if r.info is not None]
        return min(infos, key=lambda i: i.capacity_tokens)

    def close(self) -> None:
        """Stop every replica (each aborts what it runs), killing what does not stop; idempotent."""
        if self._closing:
            return
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self.listener is not None:
            self.listener.close()
        links = [r.proc for r in self.replicas if r.proc is not None and r.proc.pid is not None]
        for r in self.replicas:
            r.state = "stopped"
        for link in links:
            link.send(None)
        deadline = time.monotonic() + 10.0
        for link in links:
            link.wait(max(0.1, deadline - time.monotonic()))
            link.kill()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _launch(self, r: Replica) -> str | None:
        """Start r's process, wait for Ready, probe it; None when r is healthy, else why not."""
        r.breaker.trying()
        r.state, r.beat = "starting", None
        r.ready = self.loop.create_future()
        r.proc = LocalReplica(self.spec, f"meshlm-replica{r.index}", self._receive)
        await self.loop.run_in_executor(None, r.proc.start)  # spawning takes a while on a busy host
        try:
            r.info = await asyncio.wait_for(asyncio.shield(r.ready), self.cfg.start_timeout_s)
        except TimeoutError:
            return self._launch_failed(r, f"replica {r.index} did not load within {self.cfg.start_timeout_s:g} s")
        except EngineUnavailable as e:
            return self._launch_failed(r, str(e))
        r.beat_at = time.monotonic()
        if not await self._probe(r):
            return self._launch_failed(r, f"replica {r.index} failed its probe request")
        r.breaker.succeed()
        r.state, r.reason = "healthy", None
        return None

    def _launch_failed(self, r: Replica, why: str) -> str:
        r.state, r.reason = "failed", why
        r.breaker.fail(time.monotonic())
        if r.proc is not None:
            self.loop.run_in_executor(None, r.proc.kill)
        return why

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

    async def _recover(self, r: Replica) -> None:
        """Kill r whole, then restart and probe it whenever its breaker allows, until it is readmitted."""
        proc = r.proc
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, proc.kill)
        if r.remote:  # its host restarts it; it is readmitted when it connects again
            r.proc, r.state = None, "waiting"
            return
        while not self._closing:
            await asyncio.sleep(max(0.0, r.breaker.open_until - time.monotonic()))
            r.restarts += 1
            why = await self._launch(r)
            if why is None:
                r.recover_s = time.monotonic() - r.failed_at
                self.observe("recover", r.index, r.recover_s)
                log.warning("replica %d readmitted %.1f s after it failed", r.index, r.recover_s)
                return
            log.error("replica %d did not recover: %s", r.index, why)

    # ---- messages from replicas (reader threads -> the event loop) -------------------------------------

    def _connected(self, conn: Any) -> None:
        """A remote replica connected (listener thread): read it; its Ready message gives it a slot."""
        RemoteReplica(conn, "meshlm-remote", self._receive)

    def _attach(self, link: Link, ready: Ready) -> None:
        r = next((r for r in self.replicas if r.remote and r.state == "waiting"), None)
        if r is None:
            log.warning("replica on %s (pid %s) connected, but every remote slot is taken; dropped", ready.host,
                        ready.pid)
            self.loop.run_in_executor(None, link.kill)
            return
        r.proc, r.info, r.state = link, ready, "starting"
        r.restarts += r.failures > 0  # a failed remote replica comes back by connecting again
        self._spawn(self._admit(r))

    async def _admit(self, r: Replica) -> None:
        """A connected remote replica: after its breaker's cooldown, probe it and readmit it."""
        await asyncio.sleep(max(0.0, r.breaker.open_until - time.monotonic()))
        r.breaker.trying()
        r.beat_at = time.monotonic()
        if await self._probe(r):
            r.breaker.succeed()
            r.state, r.reason = "healthy", None
            if r.failed_at:
                r.recover_s = time.monotonic() - r.failed_at
                self.observe("recover", r.index, r.recover_s)
            log.warning("replica %d (%s, pid %s) admitted", r.index, r.proc.host, r.proc.pid)
            return
        r.breaker.fail(time.monotonic())
        self.loop.run_in_executor(None, r.proc.kill)
        r.proc, r.state, r.reason = None, "waiting", f"replica {r.index} failed its probe request"

    def _receive(self, proc: Link, msg: Any) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_message, proc, msg)
            except RuntimeError:
                pass

    def _on_message(self, proc: Link, msg: Any) -> None:
        r = next((r for r in self.replicas if r.proc is proc), None)
        if r is None and proc.remote and isinstance(msg, Ready) and not self._closing:
            return self._attach(proc, msg)
        if r is None or r.state in ("failed", "stopped"):
            return  # an earlier incarnation, or one already given up on
        if isinstance(msg, Heartbeat):
            r.beat, r.beat_at, r.snapshot = msg.beat, time.monotonic(), msg.snapshot
        elif isinstance(msg, Outs):
            self._on_outs(r, msg)
        elif isinstance(msg, Accepted):
            fut = r.acks.pop(msg.key, None)
            if fut is not None and not fut.done():
                fut.set_result(None) if msg.error is None else fut.set_exception(msg.error)
        elif isinstance(msg, Ready):
            if r.ready is not None and not r.ready.done():
                r.ready.set_result(msg)
        elif isinstance(msg, (Failed, Exited)):
            why = msg.reason if isinstance(msg, Failed) else _exit_reason(msg.exitcode)
            if r.ready is not None and not r.ready.done():
                r.ready.set_exception(EngineUnavailable(f"replica {r.index}: {why}"))
            self._fail(r, why)

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

    async def _monitor(self) -> None:
        """Every 50 ms: fail a healthy replica whose heartbeats stopped or show an engine call stuck."""
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            for r in self.replicas:
                if r.state == "healthy":
                    why = stalled(r.beat, now - r.beat_at, self.cfg.stall_s)
                    if why is not None:
                        self._fail(r, why)

    def _fail(self, r: Replica, why: str) -> None:
        """Stop routing to r, move its requests, and kill and restart it (or end the server)."""
        if r.state in ("failed", "stopped"):
            return
        if r.state == "starting":  # _launch sees its Ready or probe fail and handles it
            for fut in r.acks.values():
                if not fut.done():
                    fut.set_exception(ReplicaLost(why))
            return
        now = time.monotonic()
        r.state, r.reason, r.failed_at = "failed", f"replica {r.index}: {why}", now
        r.failures += 1
        r.breaker.fail(now)
        r.detect_s = now - r.beat_at + (r.beat.busy_s if r.beat else 0.0)  # since its last proof of progress
        self.observe("detect", r.index, r.detect_s)
        log.error("%s (detected %.2f s after its last progress)", r.reason, r.detect_s)
        for fut in r.acks.values():
            if not fut.done():
                fut.set_exception(ReplicaLost(r.reason))
        r.acks.clear()
        moved = [rec for rec in r.records.values() if rec.accepted]
        r.records.clear()
        if self.cfg.exit_on_failure:
            for rec in moved:
                self._finish(rec, "error", f"The engine failed: {r.reason}")
            if r.proc is not None:
                self.loop.run_in_executor(None, r.proc.kill)
            self.on_fatal(r.reason)
            return
        for rec in moved:
            rec.replica = None
            self._spawn(self._migrate(rec))
        self._spawn(self._recover(r))

    # ---- requests ----------------------------------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh number for request ids."""
        return next(self._ids)

    async def submit(self, request_ids: list[str], prompts: list[list[int]], params: list[SamplingParams],
                     out: asyncio.Queue, timeout_s: float | None, internal: bool = False,
                     deadline: float | None = None) -> None:
        """Route engine requests (all to one replica); raises QueueFull, RequestError or EngineUnavailable.

        deadline: an absolute time.perf_counter() limit set at arrival (else now + timeout_s); it bounds
        the request's run on every replica it moves to."""
        if deadline is None and timeout_s is not None:
            deadline = time.perf_counter() + timeout_s
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
            left = recs[0].deadline - time.perf_counter()
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
            raise
        for rec in recs:
            rec.accepted = True

    async def _migrate(self, rec: Routed) -> None:
        """Move rec to another replica: bounded attempts, jittered pauses, never past its deadline."""
        self.migrated += 1
        while not rec.done:
            rec.attempts += 1
            delay = retry_delay(self.cfg.retry, rec.attempts, time.perf_counter(), rec.deadline, self.rng)
            if delay is None:
                timed_out = rec.deadline is not None and time.perf_counter() >= rec.deadline - 1e-3
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
        until = time.perf_counter() + self.cfg.failover_wait_s
        if rec.deadline is not None:
            until = min(until, rec.deadline)
        while not rec.done and time.perf_counter() < until:
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
        return f"No healthy replica ({why}); restarting."

    def health(self) -> list[dict[str, Any]]:
        """Every replica's /health entry."""
        return [r.health() for r in self.replicas]

    @property
    def snapshot(self) -> Snapshot:
        """The replicas' latest figures, summed (queue caps of routable replicas only)."""
        snaps = [r.snapshot for r in self.replicas]
        stats = [s.stats for s in snaps]
        comm: dict[str, float] = {}
        for s in stats:
            for k, v in s.collective_seconds.items():
                comm[k] = comm.get(k, 0.0) + v
        total = EngineStats(sum(s.running for s in stats), sum(s.waiting for s in stats),
                            sum(r.snapshot.stats.max_waiting for r in self.replicas if r.routable),
                            sum(s.kv_usage for s in stats) / len(stats), sum(s.num_preemptions for s in stats),
                            sum(s.prompt_tokens for s in stats), sum(s.generation_tokens for s in stats), comm,
                            max(s.bubble_fraction for s in stats))
        return Snapshot(total, sum(s.step_seconds for s in snaps))


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "its connection closed (rank 0 exited, or its host is unreachable)"
    if code < 0:
        return f"rank 0 was killed by signal {-code}"
    return f"rank 0 exited with code {code}"
