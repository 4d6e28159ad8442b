"""The engine loop: one background thread owns the LLMEngine; the event loop talks to it through a queue.

The engine is not thread-safe, so nothing else touches it. The event loop puts commands (Submit, Abort,
Stop) on a thread-safe queue; the thread applies them between steps, runs steps while work remains, and
hands each changed request back as an immutable Update through `loop.call_soon_threadsafe` (one call per
step). A failing step (a dead rank) is fatal: every in-flight request gets an error update and
`on_fatal` is told (the replica process reports it to the router, serve/replica.py).

Liveness: `progress` counts finished engine calls (steps and idle pings) and `busy_since` is when the
current one began (None while idle), both written only by this thread, so a reader can tell an engine
that steps from one stuck in a call (a hung rank) without trusting any thread but this one; within a
call, `engine.progress()` (rank 0's decoder layers run) shows that a long step still moves.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from meshlm.config import SamplingParams
from meshlm.engine.engine import EngineStats, LLMEngine, Resume
from meshlm.engine.request import RequestOutput
from meshlm.errors import MeshlmError
from meshlm.serve.protocol import FinalStats, Update
from meshlm.serve.thread_tuner import ThreadTuner

log = logging.getLogger(__name__)


class EngineUnavailable(MeshlmError):
    """The engine stopped (a rank failed, or the server is shutting down)."""


@dataclass(frozen=True)
class Snapshot:
    """Published after every step (read by /metrics and admission without locks)."""

    stats: EngineStats = field(default_factory=EngineStats)
    step_seconds: float = 0.0  # total time inside engine.step()


@dataclass
class Submit:
    """Add engine requests (all or none) whose updates go to `out` on `loop`."""

    request_ids: list[str]
    prompts: list[list[int]]
    params: list[SamplingParams]
    timeout_s: float | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    done: asyncio.Future
    internal: bool = False  # health probes: kept out of the request metrics
    resume: list[Resume] | None = None  # per request: tokens already generated elsewhere


@dataclass
class Abort:
    """Abort engine requests (unknown or finished ids are ignored); None aborts every request."""

    request_ids: list[str] | None


@dataclass
class _Track:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    choice: int
    start: float
    internal: bool = False
    tokens_sent: int = 0
    logprobs_sent: int = 0


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if not fut.done():
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _dispatch(batch: list[tuple[asyncio.Queue, Update]]) -> None:
    for q, update in batch:
        q.put_nowait(update)


class EngineLoop:
    """Runs `engine.step()` in a background thread while requests wait or run."""

    def __init__(self, engine: LLMEngine, on_finish: Callable[[FinalStats | None, str], None] = lambda s, r: None,
                 on_fatal: Callable[[str], None] = lambda msg: None, keepalive_s: float = 10.0,
                 tune_threads: bool = True) -> None:
        self.engine = engine
        # One process: its decode steps may run on a thread fewer where that measures faster (thread_tuner.py).
        self.tune_threads = tune_threads and not engine.executor.distributed
        self.tuner: ThreadTuner | None = None  # made on the engine thread (intra-op threads are per thread)
        # Idle ranks wait for the next call: ping them now and then, which also notices a dead one.
        self.keepalive_s = keepalive_s
        self._last_call = time.monotonic()
        self.on_finish, self.on_fatal = on_finish, on_fatal
        self.commands: queue.Queue = queue.Queue()
        self.tracks: dict[str, _Track] = {}
        self.snapshot = Snapshot(engine.stats())
        self.dead: str | None = None
        self.last_progress = time.monotonic()
        self.progress = 0  # engine calls finished (steps and pings)
        self.busy_since: float | None = None  # monotonic start of the engine call now running
        self.pending = 0  # submits not yet applied (event-loop side only)
        self._step_s = 0.0
        self._ids = itertools.count()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="meshlm-engine", daemon=True)

    def start(self) -> EngineLoop:
        """Start the thread."""
        self.thread.start()
        return self

    # ---- event-loop side -------------------------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh number for request ids."""
        return next(self._ids)

    async def submit(self, request_ids: list[str], prompts: list[list[int]], params: list[SamplingParams],
                     out: asyncio.Queue, timeout_s: float | None, internal: bool = False,
                     resume: list[Resume] | None = None) -> None:
        """Queue engine requests; raises QueueFull, RequestError or EngineUnavailable (nothing added then)."""
        if self.dead is not None:
            raise EngineUnavailable(self.dead)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending += 1
        try:
            self.commands.put(Submit(request_ids, prompts, params, timeout_s, loop, out, done, internal, resume))
            await done
        finally:
            self.pending -= 1

    def abort(self, request_ids: list[str] | None) -> None:
        """Ask the thread to abort requests, or every request for None (returns at once)."""
        self.commands.put(Abort(None if request_ids is None else list(request_ids)))

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything and end the thread."""
        self.commands.put(None)
        self.thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.tune_threads:
            self.tuner = ThreadTuner(torch.get_num_threads())
        while True:
            idle = self.dead is not None or not self.engine.has_unfinished()
            try:
                cmds = [self.commands.get(timeout=0.1)] if idle else []
            except queue.Empty:
                cmds = []
            while True:
                try:
                    cmds.append(self.commands.get_nowait())
                except queue.Empty:
                    break
            for cmd in cmds:
                if cmd is None:
                    self._abort_all("abort")
                    return
                self._apply(cmd)
            failure = self.engine.failure()
            if failure is not None and self.dead is None:
                self._fatal(str(failure))
            if self.dead is None and self.engine.has_unfinished():
                self._step()
            elif self.dead is None and time.monotonic() > self._last_call + self.keepalive_s:
                self._ping()
            self._publish()

    def _apply(self, cmd: Submit | Abort) -> None:
        if isinstance(cmd, Abort) and cmd.request_ids is None:
            self._abort_all("abort")
        elif isinstance(cmd, Abort):
            batch = []
            for rid in cmd.request_ids:
                tr = self.tracks.pop(rid, None)
                if tr is not None and self.engine.abort(rid):
                    self._finished(tr, None, "abort")
                    batch.append((tr, Update(tr.choice, "", finish_reason="abort")))
            self._send(batch)
        else:
            self._add(cmd)

    def _add(self, cmd: Submit) -> None:
        exc: BaseException | None = EngineUnavailable(self.dead) if self.dead else None
        added: list[str] = []
        if exc is None:
            try:
                for i, (rid, ids, sp) in enumerate(zip(cmd.request_ids, cmd.prompts, cmd.params)):
                    resume = cmd.resume[i] if cmd.resume else None
                    self.engine.add_request(ids, sp, rid, cmd.timeout_s, resume)
                    done = len(resume.token_ids) if resume else 0
                    self.tracks[rid] = _Track(cmd.loop, cmd.out, i, time.perf_counter(), cmd.internal, done)
                    added.append(rid)
            except Exception as e:  # QueueFull, RequestError: undo the partial add
                exc = e
                for rid in added:
                    self.engine.abort(rid)
                    self.tracks.pop(rid, None)
        cmd.loop.call_soon_threadsafe(_resolve, cmd.done, exc)

    def _ping(self) -> None:
        self._last_call = self.busy_since = time.monotonic()
        try:
            self.engine.ping()
        except Exception as e:
            log.error("rank keep-alive failed: %s", e)
            self._fatal(str(e) or type(e).__name__)
        self.progress += 1
        self.busy_since = None

    def _step(self) -> None:
        self._last_call = self.busy_since = time.monotonic()
        if self.tuner is not None:
            self.tuner.before_step(self.engine.last_decode_tokens)
        done = self.engine.steps_done
        t0 = time.perf_counter()
        try:
            changed = self.engine.step()
        except Exception as e:
            log.error("engine step failed: %s", e)
            self._fatal(str(e) or type(e).__name__)
            return
        finally:
            self.busy_since = None
        seconds = time.perf_counter() - t0
        self._step_s += seconds
        if self.tuner is not None and self.engine.steps_done == done + 1:
            self.tuner.after_step(self.engine.last_decode_tokens, seconds)
        self.progress += 1
        self.last_progress = time.monotonic()
        batch = [u for u in (self._update(out) for out in changed) if u is not None]
        self._publish()  # first: a reader that sees these updates sees figures that include them
        self._send(batch)

    def _update(self, out: RequestOutput) -> tuple[_Track, Update] | None:
        tr = self.tracks.get(out.request_id)
        if tr is None:
            return None
        tokens = tuple(out.token_ids[tr.tokens_sent:])
        lps = tuple(out.logprobs[tr.logprobs_sent:]) if out.logprobs is not None else ()
        tr.tokens_sent, tr.logprobs_sent = len(out.token_ids), tr.logprobs_sent + len(lps)
        stats = None
        if out.finished:
            del self.tracks[out.request_id]
            stats = FinalStats(len(out.prompt_token_ids), len(out.token_ids), out.ttft_s, out.decode_s,
                               out.queue_s, time.perf_counter() - tr.start, out.num_preemptions,
                               out.num_cached_tokens)
            self._finished(tr, stats, out.finish_reason or "")
        return tr, Update(tr.choice, out.text, tokens, lps, out.finish_reason, None, stats)

    def _finished(self, tr: _Track, stats: FinalStats | None, reason: str) -> None:
        if tr.internal:
            return
        try:
            self.on_finish(stats, reason)
        except Exception:  # metrics must never stop the engine
            log.exception("on_finish failed")

    def _send(self, batch: list[tuple[_Track, Update]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for tr, update in batch:
            by_loop.setdefault(tr.loop, []).append((tr.out, update))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

    def _abort_all(self, reason: str, error: str | None = None) -> None:
        batch = []
        for rid, tr in list(self.tracks.items()):
            if self.dead is None:
                self.engine.abort(rid)
            self._finished(tr, None, reason)
            batch.append((tr, Update(tr.choice, "", finish_reason=reason, error=error)))
        self.tracks.clear()
        self._send(batch)

    def _fatal(self, msg: str) -> None:
        self.dead = msg
        self._abort_all("error", f"The engine failed: {msg}")
        self.on_fatal(msg)

    def _publish(self) -> None:
        self.snapshot = Snapshot(self.engine.stats(), self._step_s)
