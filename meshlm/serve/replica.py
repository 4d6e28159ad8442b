"""One data-parallel replica in its own process: an LLM (its tp x pp ranks) driven by an EngineLoop.

The router process talks to a replica through one pipe carrying the engine loop's own typed messages
(the transport moved, the types did not): router -> replica `Work` (an EngineLoop Submit without the
event-loop parts), `Abort`, and None to stop; replica -> router `Ready`, `Accepted`, `Outs` (the loop's
Updates, keyed by request id), `Heartbeat` every `beat_s`, and `Failed`. The replica's rank 0 is this
process, so one replica's death (any rank: its ranks die with it, PR_SET_PDEATHSIG) never reaches the
router. A heartbeat carries the engine thread's own progress counter and how long its current call has
run (engine_loop.py), so a thread that keeps beating while a rank is stopped still reports the stall.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlm.config import SamplingParams
from meshlm.engine.engine import Resume
from meshlm.engine.executor import process_guard
from meshlm.errors import MeshlmError
from meshlm.serve.engine_loop import Abort, EngineLoop, Snapshot
from meshlm.serve.protocol import Update
from meshlm.serve.routing import Beat

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.0002  # how long a thread may hold the GIL while another waits for it


@dataclass(frozen=True)
class ReplicaSpec:
    """How to build a replica: meshlm.LLM's keyword arguments and the liveness cadence."""

    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    beat_s: float = 0.1  # heartbeat period
    keepalive_s: float = 0.5  # an idle engine pings its ranks this often (a hung idle rank is noticed too)
    trace: tuple[str, int] | None = None  # (path, steps): record a pipeline trace
    log_level: int = logging.WARNING
    tune_threads: bool = True  # decode steps may run on a thread fewer where faster (serve/thread_tuner.py)


@dataclass(frozen=True)
class Ready:
    """The replica has loaded: what the router needs to validate and route requests."""

    vocab_size: int
    max_context: int
    capacity_tokens: int
    block_size: int
    rank_pids: tuple[int, ...]  # the ranks this process spawned (killed with it)
    pid: int = 0  # this replica's rank 0
    host: str = ""
    max_waiting: int = 0  # requests its queue holds before it refuses more


@dataclass(frozen=True)
class Work:
    """Add engine requests, all or none (EngineLoop.submit over the pipe)."""

    key: int
    request_ids: tuple[str, ...]
    prompts: tuple[tuple[int, ...], ...]
    params: tuple[SamplingParams, ...]
    timeout_s: float | None
    internal: bool = False
    resume: tuple[Resume, ...] | None = None


@dataclass(frozen=True)
class Accepted:
    """Work `key` was added (error None) or refused (QueueFull, RequestError, EngineUnavailable)."""

    key: int
    error: BaseException | None = None


@dataclass(frozen=True)
class Outs:
    """Updates of the replica's engine requests, oldest first, and the engine's figures that include them."""

    updates: tuple[tuple[str, Update], ...]
    snapshot: Snapshot | None = None


@dataclass(frozen=True)
class Heartbeat:
    """Proof of progress and the engine's latest figures."""

    beat: Beat
    snapshot: Snapshot


@dataclass(frozen=True)
class Failed:
    """The replica cannot serve: a rank failed, or it could not load."""

    reason: str


@dataclass(frozen=True)
class Exited:
    """The other end's connection closed (told to each side by its own reader thread, never sent)."""

    exitcode: int | None


class _Outbox:
    """Batches the replica's updates into one Outs message per event-loop turn (about one per engine step)."""

    def __init__(self, send: Callable[[Any], None], aloop: asyncio.AbstractEventLoop,
                 snapshot: Callable[[], Snapshot]) -> None:
        self.send, self.aloop, self.snapshot = send, aloop, snapshot
        self.items: list[tuple[str, Update]] = []

    def add(self, rid: str, u: Update) -> None:
        """Queue one update; the first of a turn schedules the flush."""
        if not self.items:
            self.aloop.call_soon(self.flush)
        self.items.append((rid, u))

    def flush(self) -> None:
        """Send what was queued."""
        items, self.items = self.items, []
        if items:
            self.send(Outs(tuple(items), self.snapshot()))


class _WorkQueue:
    """Stands in for a Work's asyncio.Queue in EngineLoop (only put_nowait is used): tags each update with
    its request id and holds them until the Work has been acknowledged."""

    def __init__(self, request_ids: tuple[str, ...], outbox: _Outbox) -> None:
        self.ids, self.outbox = request_ids, outbox
        self.held: list[Update] | None = []

    def put_nowait(self, u: Update) -> None:
        """An update of choice u.choice (event-loop thread)."""
        if self.held is not None:
            self.held.append(u)
        else:
            self.outbox.add(self.ids[u.choice], u)

    def release(self) -> None:
        """The Work is acknowledged: pass on what was held and everything after."""
        held, self.held = self.held or [], None
        for u in held:
            self.outbox.add(self.ids[u.choice], u)


def replica_main(conn: Any, spec: ReplicaSpec, remote: bool = False) -> None:
    """Body of a replica process: load, report Ready, serve Work until told to stop or the router goes.

    Exits 0 when told to stop, 1 when the router went away or dropped it (so a launcher restarts it).
    A local replica dies with the router and leaves signals to it; a remote one (`serve --join`) obeys its own.
    """
    if not remote:
        process_guard()
        for sig in (signal.SIGINT, signal.SIGTERM):  # the router stops local replicas (inherited by ranks)
            signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level)
    # tqdm's default lock is a multiprocessing semaphore, left to the resource tracker when a replica is
    # killed; a thread lock is all one process needs.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    # The engine thread and the event loop share the GIL; at Python's default 5 ms switch interval the
    # engine waits up to 5 ms each time the loop holds it (streaming a token), several times per step.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    lock = threading.Lock()

    def send(msg: Any) -> None:
        with lock:
            conn.send(msg)

    try:
        from meshlm.llm import LLM

        llm = LLM(**spec.llm_kwargs)
        if spec.trace:
            llm.engine.record_trace(*spec.trace)
    except BaseException as e:
        send(Failed(str(e) if isinstance(e, MeshlmError) else "".join(traceback.format_exception(e))[-4000:]))
        os._exit(1)
    try:
        dropped = asyncio.run(_serve(conn, send, llm, spec))
    finally:
        llm.close()
    os._exit(1 if dropped else 0)


async def _serve(conn: Any, send: Callable[[Any], None], llm: Any, spec: ReplicaSpec) -> bool:
    """Serve until told to stop (False) or the connection is lost (True)."""
    aloop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    lost = [False]
    eng = EngineLoop(llm.engine, on_fatal=lambda msg: send(Failed(msg)), keepalive_s=spec.keepalive_s,
                     tune_threads=spec.tune_threads).start()
    send(Ready(llm.cfg.vocab_size, llm.max_context, llm.engine.capacity_tokens, llm.engine.ecfg.block_size,
               llm.executor.rank_pids, os.getpid(), socket.gethostname(), llm.engine.stats().max_waiting))
    tasks: set[asyncio.Task] = set()

    outbox = _Outbox(send, aloop, lambda: eng.snapshot)

    async def work(w: Work) -> None:
        out = _WorkQueue(w.request_ids, outbox)
        try:
            await eng.submit(list(w.request_ids), [list(p) for p in w.prompts], list(w.params), out,
                             w.timeout_s, w.internal, list(w.resume) if w.resume else None)
        except Exception as e:
            send(Accepted(w.key, e))
            return
        send(Accepted(w.key))  # before any of its updates: the router moves only acknowledged requests
        out.release()

    def handle(msg: Any) -> None:
        if msg is None or isinstance(msg, Exited):
            lost[0] = msg is not None
            stopped.set()
        elif isinstance(msg, Abort):
            eng.abort(msg.request_ids)
        else:
            task = asyncio.ensure_future(work(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = Exited(None)
            aloop.call_soon_threadsafe(handle, msg)
            if msg is None or isinstance(msg, Exited):
                return

    def beats() -> None:
        layers, moved = -1, time.monotonic()
        while not stopped.is_set():
            now, done = time.monotonic(), llm.engine.progress()
            if done != layers:  # the step itself advanced: a long prefill is not a hang
                layers, moved = done, now
            since = eng.busy_since  # read once: the engine thread may reset it meanwhile
            busy = 0.0 if since is None else max(1e-6, now - max(since, moved))
            try:
                send(Heartbeat(Beat(eng.progress + layers, busy), eng.snapshot))
            except (OSError, ValueError):
                aloop.call_soon_threadsafe(handle, Exited(None))
                return
            time.sleep(spec.beat_s)

    threading.Thread(target=reader, name="meshlm-replica-reader", daemon=True).start()
    threading.Thread(target=beats, name="meshlm-heartbeat", daemon=True).start()
    await stopped.wait()
    eng.stop(timeout=10.0)
    return lost[0]
