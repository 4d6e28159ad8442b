"""Start ranks and watch them: local spawn (no torchrun needed) or torchrun across machines.

Rank 0 is the driving process. Locally it spawns ranks 1..N-1 itself; a watchdog thread polls them, and
when one dies it names the rank and its error, terminates the rest, and unblocks rank 0 (no hang, no
orphan: spawned ranks also die with their parent through PR_SET_PDEATHSIG). Under torchrun every
process runs `python -m meshlm.launch ...`; ranks other than 0 serve calls until told to stop.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from meshlm.errors import ConfigError, MeshlmError

log = logging.getLogger(__name__)


class RankFailure(MeshlmError):
    """A rank died or raised; the message names it."""


@dataclass(frozen=True)
class RendezvousInfo:
    """How ranks find each other."""

    rank: int
    world_size: int
    init_method: str  # "tcp://127.0.0.1:PORT" or "env://"
    backend: str = "gloo"
    timeout_s: float = 60.0  # the collective timeout (--comm-timeout): how long a started rank may go quiet
    startup_timeout_s: float = 60.0  # ranks may join up to max(this, timeout_s) apart (slow imports, loads)

    @property
    def startup_s(self) -> float:
        """How long the rendezvous and the steps up to the ready barrier wait for the slowest rank."""
        return max(self.timeout_s, self.startup_timeout_s)


def under_torchrun() -> bool:
    """True when torchrun (or another launcher) set RANK/WORLD_SIZE for this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def kill_processes(pids: list[int], timeout: float = 5.0) -> None:
    """SIGKILL pids (a stopped process dies too), wait until none is alive, then unlink their shm segments."""
    from meshlm.parallel import shm

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(shm.pid_alive(p) for p in pids):
        time.sleep(0.02)  # children are reaped by their parent; others by init once their parent is gone
    shm.sweep_stale()


def claim_default_group() -> None:
    """Refuse to start ranks while this process's default process group is taken (by a live LLM)."""
    if dist.is_initialized():
        gc.collect()  # an unreachable LLM in a reference cycle: its finalizer closes it and frees the group
    if dist.is_initialized():
        raise ConfigError(
            "another meshlm.LLM with several ranks is still open in this process (it holds torch.distributed's "
            "default process group, and a process has one). Call close() on it first, or create it as "
            "`with meshlm.LLM(...) as llm:`; an LLM with tp=1 and pp=1 needs no process group."
        )


def init_distributed(rv: RendezvousInfo) -> list[str]:
    """Join every rank (waiting up to rv.startup_s for the last), then init_process_group; returns every rank's
    hostname, by rank. The default group keeps the startup timeout until startup_done() lowers it.

    A rank that has not joined by then fails every other rank with RankFailure naming it.
    """
    from datetime import timedelta

    startup = timedelta(seconds=rv.startup_s)
    try:
        if rv.init_method.startswith("tcp://"):  # rank 0 serves the store; it waits for the others below
            host, port = rv.init_method[len("tcp://"):].rsplit(":", 1)
            store = dist.TCPStore(host, int(port), rv.world_size, rv.rank == 0, startup, wait_for_workers=False)
        else:  # env:// (torchrun: its agent's store)
            store, _, _ = next(dist.rendezvous(rv.init_method, rv.rank, rv.world_size, timeout=startup))
    except (RuntimeError, ValueError) as e:
        raise RankFailure(f"rank {rv.rank}: the rendezvous store ({rv.init_method}) did not answer within "
                          f"{rv.startup_s:g} s: {e}. Start every node (rank 0's too) and check that this host can "
                          "reach rank 0's (address, port, firewall).") from None
    keys = [f"meshlm/joined/{r}" for r in range(rv.world_size)]
    store.set(keys[rv.rank], socket.gethostname())
    try:
        store.wait(keys, startup)
    except RuntimeError:  # the wait timed out, or rank 0 gave up first and its store is gone
        try:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {rv.world_size}"
        except RuntimeError:
            who = f"not all {rv.world_size} ranks"
        raise RankFailure(
            f"rank {rv.rank}: {who} did not join within {rv.startup_s:g} s (the startup timeout, "
            f"max(--comm-timeout, {rv.startup_timeout_s:g} s)). Start every node (torchrun on each host, same "
            "--rdzv-endpoint and --nnodes) and check that the hosts can reach each other (GLOO_SOCKET_IFNAME)."
        ) from None
    dist.init_process_group(rv.backend, store=store, rank=rv.rank, world_size=rv.world_size, timeout=startup)
    return [store.get(k).decode() for k in keys]


def startup_done(rv: RendezvousInfo) -> None:
    """Every rank, after the ready barrier: the default group's collectives now time out after rv.timeout_s."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=rv.timeout_s))


def other_hosts(hosts: list[str], rank: int, ranks: list[int] | None = None) -> str:
    """'; ranks on other hosts: rank 1 on h1, ...' as seen from member `rank` of `ranks` (default: the world;
    hosts by member) ('' when every member shares its host).

    A collective that times out does not say which peer went quiet; across hosts a lost link is the usual
    cause, so the error names the ranks behind one.
    """
    ranks = ranks if ranks is not None else list(range(len(hosts)))
    far = [f"rank {ranks[i]} on {h}" for i, h in enumerate(hosts) if h != hosts[rank]]
    return f"; ranks on other hosts (one of them failed or is unreachable): {', '.join(far)}" if far else ""


def shutdown_distributed() -> None:
    """Destroy the default process group if there is one (best effort: a failed peer may have broken it)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _child_main(rv: RendezvousInfo, serve: Callable[[RendezvousInfo], None], errors: Any) -> None:
    die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    # tqdm's default lock is a multiprocessing semaphore; a rank ends with os._exit, which skips its
    # cleanup, so the resource tracker would report it leaked. A thread lock is all one rank needs.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        serve(rv)
    except BaseException as e:  # report anything, including KeyboardInterrupt, then exit non-zero
        msg = str(e) if isinstance(e, MeshlmError) else "".join(traceback.format_exception(e))[-4000:]
        try:
            errors.send((rv.rank, msg))
        except Exception:
            pass
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


class LocalRanks:
    """Spawned ranks 1..N-1 of a local launch plus the watchdog that notices their death."""

    def __init__(self, world_size: int, serve: Callable[[RendezvousInfo], None], backend: str,
                 timeout_s: float, grace_s: float = 10.0) -> None:
        self.port = free_port()
        self.init_method = f"tcp://127.0.0.1:{self.port}"
        ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.pipes: dict[int, Any] = {}
        self.failure: tuple[int, str] | None = None
        self.stopping = False
        self.grace_s = grace_s
        self._closing = threading.Lock()  # the watchdog and rank 0 may both terminate at once
        self._closed = False
        for r in range(1, world_size):
            rv = RendezvousInfo(r, world_size, self.init_method, backend, timeout_s)
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, args=(rv, serve, writer), name=f"meshlm-rank{r}",
                            daemon=True)
            p.start()
            writer.close()
            self.procs[r], self.pipes[r] = p, reader
        self._watch = threading.Thread(target=self._watchdog, name="meshlm-watchdog", daemon=True)
        self._watch.start()

    def rendezvous(self, world_size: int, backend: str, timeout_s: float) -> RendezvousInfo:
        """Rank 0's rendezvous info."""
        return RendezvousInfo(0, world_size, self.init_method, backend, timeout_s)

    def _watchdog(self) -> None:
        while not self.stopping:
            for r, p in self.procs.items():
                if p.exitcode is not None and not self.stopping:
                    self._fail(r, p.exitcode)
                    return
            time.sleep(0.05)

    def _fail(self, rank: int, code: int) -> None:
        msg = f"exited with code {code}"
        with self._closing:  # rank 0's shutdown must not close the pipe while it is read
            try:
                if not self._closed and self.pipes[rank].poll(1.0):
                    rank, msg = self.pipes[rank].recv()
            except (EOFError, OSError):
                pass
        if code < 0:
            msg = f"killed by signal {-code}" + ("" if msg.startswith("exited") else f": {msg}")
        self.failure = (rank, msg)
        log.error("rank %d failed: %s", rank, msg)
        self.terminate()
        # Rank 0 may sit in a collective that its peers' exit doesn't break: give it a grace period.
        t = threading.Timer(self.grace_s, self._hard_exit)
        t.daemon = True
        t.start()

    def _hard_exit(self) -> None:
        if self.failure is not None and not self.stopping:
            print(f"meshlm: error: {self.failed()}", file=sys.stderr, flush=True)
            os._exit(1)

    def error(self, exc: BaseException | None = None) -> RankFailure:
        """The error to raise on rank 0 after a collective failed (waits briefly for the watchdog)."""
        deadline = time.time() + 3.0
        while self.failure is None and time.time() < deadline:
            time.sleep(0.05)
        return self.failed() or RankFailure(f"a collective failed: {exc}")

    def failed(self) -> RankFailure | None:
        """The watchdog's finding as the error to raise, or None while every rank lives."""
        if self.failure is None:
            return None
        rank, msg = self.failure
        return RankFailure(f"rank {rank} failed: {msg}")

    def terminate(self) -> None:
        """Kill every spawned rank, reap it and close its error pipe (once, from either thread)."""
        with self._closing:
            if self._closed:
                return
            for p in self.procs.values():
                if p.is_alive():
                    p.kill()
            for p in self.procs.values():
                p.join(timeout=5)
            for pipe in self.pipes.values():
                pipe.close()
            self._closed = True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Wait for ranks told to stop; kill stragglers."""
        self.stopping = True
        deadline = time.time() + timeout
        for p in self.procs.values():
            p.join(timeout=max(0.1, deadline - time.time()))
        self.terminate()
