"""Drives every rank with one verb: call(method, *args) runs Worker.method on all ranks in lockstep.

Engine steps go through submit(step) / collect(): with one stage, submit runs the step on every rank
(call("execute")); with pp stages, the ranks enter their stage loop (call "serve_pipeline") and up to pp
steps are in flight at once (engine/pipeline_stage.py). Any other call first ends the stage loop.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from meshlm.engine.worker import Worker, WorkerSpec
from meshlm.errors import ConfigError
from meshlm.parallel.comm import build_control_group, build_groups, single_process_groups
from meshlm.parallel.launch import (
    LocalRanks,
    RankFailure,
    RendezvousInfo,
    claim_default_group,
    die_with_parent,
    init_distributed,
    kill_processes,
    other_hosts,
    shutdown_distributed,
    startup_done,
    under_torchrun,
)
from meshlm.parallel.shm import PeerLostError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """A control message from rank 0: run `method(*args)`; gather=True returns every rank's result."""

    method: str
    args: tuple = ()
    gather: bool = False


def serve_rank(rv: RendezvousInfo, spec: WorkerSpec) -> None:
    """Body of every rank but 0: build the worker, then execute calls until told to stop."""
    hosts = init_distributed(rv)
    try:
        groups = build_groups(spec.dims, rv.rank, rv.backend, rv.timeout_s, spec.transport)
        control = build_control_group(rv.world_size, rv.rank, rv.timeout_s, spec.transport, groups.world.members)
        worker = Worker(spec, groups, rv.rank)
        groups.world.barrier()  # ready
        startup_done(rv)
        while True:
            call: Call | None = control.broadcast_object(None, 0)
            if call is None:
                break
            result = getattr(worker, call.method)(*call.args)
            if call.gather:
                groups.world.gather_object(result, 0)
    except RuntimeError as e:  # a collective failed: a peer died, stopped or cannot be reached
        raise RankFailure(f"rank {rv.rank}: a collective failed: {e}{_suspects(e, hosts, rv.rank)}") from None
    shutdown_distributed()


def _suspects(exc: BaseException, hosts: list[str], rank: int) -> str:
    """other_hosts() unless the error names the lost member already (Comm.lost, shm waiters)."""
    return "" if isinstance(exc, PeerLostError) else other_hosts(hosts, rank)


def process_guard() -> None:
    """In a process that owns ranks (a serving replica): die with the parent that started it."""
    die_with_parent()


def kill_ranks(pids: list[int]) -> None:
    """Kill a replica's processes (its rank 0 and the ranks it spawned) and remove their shm segments."""
    kill_processes(pids)


def launched_by_torchrun() -> tuple[bool, int]:
    """(True, this process's rank) under torchrun, else (False, 0)."""
    return (True, int(os.environ["RANK"])) if under_torchrun() else (False, 0)


class Executor:
    """Owns rank 0's worker and the other ranks (spawned locally or started by torchrun)."""

    def __init__(self, spec: WorkerSpec, timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.local: LocalRanks | None = None
        self.distributed = False
        self.closed = False
        self.pipelining = False  # the other ranks are in their stage loop (pp > 1)
        self.in_flight = 0  # steps submitted and not yet collected (pp > 1)
        self.broken = False  # a rank failed: the ranks are gone and nothing in flight will come back
        self._done: deque = deque()  # outputs of steps run at once (pp == 1)
        backend = spec.device.pg_backend
        world = spec.dims.world_size
        if world > 1 or under_torchrun():
            claim_default_group()  # before any rank starts: a second live distributed LLM is refused here
        if under_torchrun():
            env_world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            if env_world != world:
                raise ConfigError(
                    f"torchrun started {env_world} processes but the layout needs {world} "
                    f"({spec.dims}); make --nnodes x --nproc-per-node equal dp x pp x tp."
                )
            rv = RendezvousInfo(rank, world, "env://", backend, timeout_s)
            if rank != 0:
                serve_rank(rv, replace(spec, progress=False))
                sys.exit(0)
        elif world == 1:
            self.worker = Worker(spec, single_process_groups())
            self.groups = None
            return
        else:
            self.local = LocalRanks(world, partial(serve_rank, spec=replace(spec, progress=False)),
                                    backend, timeout_s)
            rv = self.local.rendezvous(world, backend, timeout_s)
        self.distributed = True
        self.hosts = [os.uname().nodename]
        try:
            self.hosts = init_distributed(rv)
            self.groups = build_groups(spec.dims, 0, backend, timeout_s, spec.transport)
            self.control = build_control_group(world, 0, timeout_s, spec.transport, self.groups.world.members)
            self.worker = Worker(spec, self.groups, 0)
            self.groups.world.barrier()
            startup_done(rv)
        except RuntimeError as e:
            raise self._failure(e) from None
        except BaseException:
            self.close(graceful=False)
            raise

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.spec.dims.world_size

    @property
    def rank_pids(self) -> tuple[int, ...]:
        """Process ids of the ranks this process spawned (none under torchrun or with one rank)."""
        return tuple(p.pid for p in self.local.procs.values()) if self.local is not None else ()

    @property
    def failure(self) -> RankFailure | None:
        """Why the spawned ranks are gone (a rank died or raised), or None while every one lives."""
        return self.local.failed() if self.local is not None else None

    def progress(self) -> int:
        """Decoder layers rank 0 has run (a plain read, safe from any thread; it stops while a peer hangs)."""
        worker = self.worker
        return worker.layers_run() if worker is not None else 0

    def ping(self) -> None:
        """One cheap call on every rank: an idle rank's wait restarts, and a dead one raises RankFailure."""
        if self.distributed:
            self.call("comm_stats")

    def collective_seconds(self) -> dict[str, float]:
        """Rank 0's seconds inside collectives, by "group/op" (none once closed)."""
        return {} if self.worker is None else {k: v["seconds"] for k, v in self.worker.comm_stats().items()}

    def experts_dropped(self) -> int:
        """Rows the expert capacity factor dropped, over the group (rank 0 holds the group's count; ep > 1)."""
        load = getattr(self.worker, "expert_load", None)
        return load.total_dropped() if load is not None else 0
    def cp_ring_choices(self) -> dict[str, int]:
        """cp > 1: rank 0's prefill ring choices so far, by ring ({} otherwise or once closed)."""
        return {} if self.worker is None else self.worker.cp_ring_choices()

    def expert_figures(self):
        """Rank 0's expert balance, per-expert load and per-link bytes (None without expert parallelism)."""
        return self.worker.expert_figures() if self.worker is not None else None

    def bubble_fraction(self) -> float:
        """Rank 0's share of pipelined time spent waiting for the later stages (0 when pp == 1)."""
        stages = getattr(self.worker, "stages", None)
        return stages.bubble_fraction() if stages is not None else 0.0

    def _failure(self, exc: BaseException) -> RankFailure:
        err = (self.local.error(exc) if self.local
               else RankFailure(f"a collective failed: {exc}{_suspects(exc, self.hosts, 0)}"))
        self.broken, self.in_flight, self.pipelining = True, 0, False
        self.close(graceful=False)
        return err

    @property
    def cp(self) -> int:
        """Context-parallel ranks: each KV block id covers block_size tokens on every one of them."""
        return self.spec.dims.cp

    @property
    def depth(self) -> int:
        """Engine steps that may be in flight at once: one per pipeline stage."""
        return self.spec.dims.pp

    def _check_open(self) -> None:
        if self.broken:
            raise RankFailure("the ranks of this LLM failed earlier; create a new meshlm.LLM.")
        if self.closed:
            raise ConfigError("this LLM is closed (close() ended its ranks); create a new meshlm.LLM.")

    def submit(self, step: Any) -> None:
        """Start an engine step (a StepInput); its output comes from collect(), in submission order."""
        self._check_open()
        if self.spec.dims.pp == 1:
            self._done.append(self.call("execute", step))
            return
        try:
            if not self.pipelining:
                self.control.broadcast_object(Call("serve_pipeline"), 0)
                self.pipelining = True
            self.worker.stages.submit(step)
            self.in_flight += 1
        except RuntimeError as e:
            raise self._failure(e) from None

    def collect(self) -> Any:
        """The StepOutput of the oldest submitted step (waits for the last stage)."""
        if self.spec.dims.pp == 1:
            return self._done.popleft()
        try:
            out = self.worker.stages.collect()
        except RuntimeError as e:
            raise self._failure(e) from None
        self.in_flight -= 1
        return out

    def pause(self) -> None:
        """Send the ranks back from their stage loop to the control loop (no-op when they are there)."""
        if not self.pipelining:
            return
        if self.in_flight:
            raise RuntimeError(f"{self.in_flight} engine steps are in flight; collect() them first")
        self.pipelining = False
        try:
            self.worker.stages.end()
        except RuntimeError as e:
            raise self._failure(e) from None

    def call(self, method: str, *args: Any) -> Any:
        """Run worker.method(*args) on every rank; return rank 0's result."""
        self._check_open()
        if not self.distributed:
            return getattr(self.worker, method)(*args)
        self.pause()
        try:
            self.control.broadcast_object(Call(method, args), 0)
            return getattr(self.worker, method)(*args)
        except RuntimeError as e:
            raise self._failure(e) from None

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Run worker.method(*args) on every rank; return every rank's result, by rank."""
        self._check_open()
        if not self.distributed:
            return [getattr(self.worker, method)(*args)]
        self.pause()
        try:
            self.control.broadcast_object(Call(method, args, gather=True), 0)
            return self.groups.world.gather_object(getattr(self.worker, method)(*args), 0)
        except RuntimeError as e:
            raise self._failure(e) from None

    def close(self, graceful: bool = True) -> None:
        """Stop every rank, tear down the process groups and free this rank's model (idempotent)."""
        self.closed = True
        self._done.clear()
        if not self.distributed:
            self.worker = None  # the weights and KV pool go with it
            return
        if graceful and self.pipelining:
            try:
                while self.in_flight:  # drain: the last stage's posted replies must be taken
                    self.collect()
                self.pause()
            except Exception:
                graceful = False
        self.distributed = False
        if graceful:
            try:
                self.control.broadcast_object(None, 0)
            except Exception:
                graceful = False
        if self.local:
            if graceful:
                self.local.shutdown()
            else:
                self.local.stopping = True
                self.local.terminate()
        for comms in (getattr(self, "groups", None), getattr(self, "control", None)):
            if comms is not None:
                comms.close()  # unmap the shared-memory segments
        shutdown_distributed()
        self.worker = self.groups = self.control = None  # nothing of the destroyed groups stays reachable
