"""The replicas' life, as the router sees it: start, watch, fail, kill, restart, readmit (serve/router.py).

A `Replica` is a slot: its process (or connection) changes with each restart. `Fleet` starts the local
replicas (each in its own process, serve/links.py) and admits remote ones as they connect; it receives
every replica's messages on the event loop and fails a replica when its process exits, it reports a
failed rank, or its heartbeats show no progress for `stall_s` (routing.stalled). A failed replica is
taken off at once (the router moves its requests: `_evacuate`), killed whole, and restarted in the
background after its circuit breaker's cooldown, then probed and readmitted; a remote one is dropped and
readmitted when it connects again. With exit_on_failure a failure ends the server instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlm.serve.engine_loop import EngineUnavailable, Snapshot
from meshlm.serve.links import Link, LocalReplica, RemoteReplica, ReplicaListener
from meshlm.serve.replica import Accepted, Exited, Failed, Heartbeat, Outs, Ready, ReplicaSpec
from meshlm.serve.routing import Beat, CircuitBreaker, ReplicaView, RetryPolicy, stalled

log = logging.getLogger(__name__)


class ReplicaLost(Exception):
    """The replica failed before it acknowledged the work sent to it."""


@dataclass(frozen=True)
class RouterConfig:
    """dp, detection, retries and recovery."""

    dp: int = 1
    remote: int = 0  # of the dp replicas, how many connect from other hosts (`serve --join`)
    listen: tuple[str, int] | None = None  # where remote replicas connect
    key: bytes = field(default=b"", repr=False)  # their shared secret
    stall_s: float = 1.25  # a replica silent or stuck in one engine call this long has failed
    affinity_slack_tokens: int = 2048  # prefix affinity yields to the least busy replica beyond this
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    failover_wait_s: float = 120.0  # a moved request waits this long at most for a routable replica
    start_timeout_s: float = 600.0  # loading a replica
    probe_timeout_s: float = 10.0  # the readmission probe
    exit_on_failure: bool = False


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
        self.records: dict[str, Any] = {}  # request id -> router.Routed
        self.acks: dict[int, asyncio.Future] = {}
        self.failed_at = 0.0
        self.failures = self.restarts = 0
        self.detect_s = self.recover_s = 0.0
        self.named: str | None = None  # a failed replica's own account, when it came after the detection

    def take(self, snap: Snapshot | None) -> None:
        """Keep the newer of snap and the current figures (heartbeats and updates race on the wire)."""
        if snap is not None and snap.step_seconds >= self.snapshot.step_seconds:
            self.snapshot = snap

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


class Fleet:
    """Starts, watches, kills and restarts the replicas; the Router (a subclass) moves their requests."""

    def __init__(self, spec: ReplicaSpec, cfg: RouterConfig, on_fatal: Callable[[str], None],
                 observe: Callable[..., None]) -> None:
        self.spec, self.cfg = spec, cfg
        self.on_fatal, self.observe = on_fatal, observe  # observe("detect" | "recover", replica, seconds)
        self.replicas = [Replica(i, remote=i >= cfg.dp - cfg.remote) for i in range(cfg.dp)]
        self.listener: ReplicaListener | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
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
        r.state, r.beat, r.snapshot = "starting", None, Snapshot()
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
        r.proc, r.info, r.state, r.snapshot = link, ready, "starting", Snapshot()
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
        if r is not None and r.state == "failed" and isinstance(msg, (Failed, Exited)):
            r.named = msg.reason if isinstance(msg, Failed) else r.named or ""  # what the replica said late
        if r is None or r.state in ("failed", "stopped"):
            return  # an earlier incarnation, or one already given up on
        if isinstance(msg, Heartbeat):
            r.beat, r.beat_at = msg.beat, time.monotonic()
            r.take(msg.snapshot)
        elif isinstance(msg, Outs):
            r.take(msg.snapshot)
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

    async def _monitor(self) -> None:
        """Every 50 ms: fail a healthy replica whose heartbeats stopped or show an engine call stuck."""
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            for r in self.replicas:
                if r.state == "healthy":
                    why = stalled(r.beat, now - r.beat_at, self.cfg.stall_s)
                    if why is not None:
                        self._fail(r, why, stall=True)

    def _fail(self, r: Replica, why: str, stall: bool = False) -> None:
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
        if self.cfg.exit_on_failure:
            self._evacuate(r, move=False)
            r.named = None
            self._spawn(self._exit_after(r, stall))
            return
        self._evacuate(r, move=True)
        self._spawn(self._recover(r))

    async def _exit_after(self, r: Replica, stall: bool) -> None:
        """--exit-on-failure: end the server. After a stall, first give the replica its collective timeout
        to name the rank (and host) that failed: the message a supervisor's operator reads."""
        if stall:
            deadline = time.monotonic() + self.spec.llm_kwargs.get("comm_timeout_s", 60.0) + 1.0
            while r.named is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if r.proc is not None:
            await self.loop.run_in_executor(None, r.proc.kill)
        self.on_fatal(f"replica {r.index}: {r.named}" if r.named else r.reason)

    # ---- what the router provides ------------------------------------------------------------------------

    def _evacuate(self, r: Replica, move: bool) -> None:
        """Take r's accepted requests off it: move them to other replicas, or fail them."""
        raise NotImplementedError

    def _on_outs(self, r: Replica, msg: Outs) -> None:
        """Updates of r's requests."""
        raise NotImplementedError

    async def _probe(self, r: Replica) -> bool:
        """Send r a 1-token request; True when it finishes in time."""
        raise NotImplementedError


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "its connection closed (rank 0 exited, or its host is unreachable)"
    if code < 0:
        return f"rank 0 was killed by signal {-code}"
    return f"rank 0 exited with code {code}"
