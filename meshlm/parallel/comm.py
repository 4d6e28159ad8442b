"""Every collective meshlm uses, named by what it does; counted and timed; a no-op for a group of one.

Process groups are made once (build_groups) and passed in. Backends: gloo on CPU, NCCL on CUDA, or an
override. Statistics (calls, bytes, seconds per op) feed telemetry: `stats()` returns a snapshot.
Bytes count the local payload each rank hands to the op (the input tensor's size).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class OpStats:
    """Totals for one op on one group."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    """Per-(group, op) totals for this process."""

    ops: dict[tuple[str, str], OpStats] = field(default_factory=lambda: defaultdict(OpStats))

    def record(self, group: str, op: str, nbytes: int, seconds: float) -> None:
        """Add one call."""
        s = self.ops[(group, op)]
        s.calls += 1
        s.bytes += nbytes
        s.seconds += seconds

    def total_seconds(self) -> float:
        """Seconds spent in all collectives."""
        return sum(s.seconds for s in self.ops.values())

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{"group/op": {"calls", "bytes", "seconds"}} (a copy)."""
        return {f"{g}/{o}": {"calls": s.calls, "bytes": s.bytes, "seconds": s.seconds}
                for (g, o), s in self.ops.items()}

    def reset(self) -> None:
        """Forget all totals."""
        self.ops.clear()


STATS = CommStats()


def default_backend(device: torch.device | str) -> str:
    """gloo for CPU tensors, nccl for CUDA."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class Comm:
    """Collectives over one process group (global ranks `ranks`); this process is `ranks[index]`."""

    def __init__(self, name: str, ranks: list[int], group: Any, global_rank: int,
                 stats: CommStats = STATS, transport: str = "gloo") -> None:
        self.name = name
        self.ranks = list(ranks)
        self.group = group
        self.size = len(ranks)
        self.index = ranks.index(global_rank) if global_rank in ranks else -1
        self.stats = stats
        self.transport = transport

    def _timed(self, op: str, nbytes: int, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.stats.record(self.name, op, nbytes, time.perf_counter() - t0)
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the group, in place; returns t."""
        if self.size == 1:
            return t
        self._timed("all_reduce", t.numel() * t.element_size(), dist.all_reduce, t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's t along dim; `sizes` gives each rank's length there when uneven."""
        if self.size == 1:
            return t
        dim = dim % t.dim()
        longest = max(sizes) if sizes else t.shape[dim]
        if t.shape[dim] < longest:  # gloo needs equal sizes: pad, gather, trim
            pad = list(t.shape)
            pad[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._timed("all_gather", t.numel() * t.element_size(), dist.all_gather, parts, t, group=self.group)
        if sizes:
            parts = [p.narrow(dim, 0, n) for p, n in zip(parts, sizes)]
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum t over the group and keep this rank's equal chunk along dim."""
        if self.size == 1:
            return t
        full = self.all_reduce(t.clone())  # gloo lacks reduce_scatter: reduce then slice (bytes counted once)
        return full.chunk(self.size, dim=dim)[self.index].contiguous()

    def all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Send chunks[i] to rank i of the group; return what each rank sent here (shapes must agree)."""
        if self.size == 1:
            return chunks
        out = [torch.empty_like(c) for c in chunks]
        nbytes = sum(c.numel() * c.element_size() for c in chunks)
        self._timed("all_to_all", nbytes, dist.all_to_all, out, [c.contiguous() for c in chunks],
                    group=self.group)
        return out

    def broadcast(self, t: torch.Tensor, src_index: int = 0) -> torch.Tensor:
        """Copy t from group member src_index to all members, in place."""
        if self.size == 1:
            return t
        self._timed("broadcast", t.numel() * t.element_size(), dist.broadcast, t,
                    src=self.ranks[src_index], group=self.group)
        return t

    def broadcast_object(self, obj: Any = None, src_index: int = 0) -> Any:
        """Send a small Python object (control messages between our own ranks) from src_index to all."""
        if self.size == 1:
            return obj
        box = [obj]
        self._timed("broadcast_object", 0, dist.broadcast_object_list, box, src=self.ranks[src_index],
                    group=self.group)
        return box[0]

    def send(self, t: torch.Tensor, dst_index: int) -> None:
        """Point-to-point send to a group member."""
        self._timed("send", t.numel() * t.element_size(), dist.send, t.contiguous(),
                    dst=self.ranks[dst_index], group=self.group)

    def recv(self, t: torch.Tensor, src_index: int) -> torch.Tensor:
        """Receive into t from a group member; returns t."""
        self._timed("recv", t.numel() * t.element_size(), dist.recv, t, src=self.ranks[src_index],
                    group=self.group)
        return t

    def barrier(self) -> None:
        """Wait for every member."""
        if self.size > 1:
            dist.barrier(group=self.group)


@dataclass
class Groups:
    """The communicators one rank takes part in."""

    world: Comm
    tp: Comm
    pp: Comm
    dp: Comm


def single_process_groups() -> Groups:
    """Groups of one, for running without torch.distributed."""
    one = Comm("single", [0], None, 0)
    return Groups(world=one, tp=one, pp=one, dp=one)


def build_groups(dims, rank: int, backend: str, timeout_s: float) -> Groups:
    """Create every named group (all ranks call this in the same order)."""
    timeout = timedelta(seconds=timeout_s)
    world = Comm("world", list(range(dims.world_size)), dist.group.WORLD, rank, transport=backend)

    def make(name: str, all_groups: list[list[int]]) -> Comm:
        mine = None
        for ranks in all_groups:
            g = dist.new_group(ranks, backend=backend, timeout=timeout) if len(ranks) > 1 else None
            if rank in ranks:
                mine = Comm(name, ranks, g, rank, transport=backend)
        assert mine is not None
        return mine

    return Groups(world=world, tp=make("tp", dims.tp_groups()), pp=make("pp", dims.pp_groups()),
                  dp=make("dp", dims.dp_groups()))
