"""Every collective meshlm uses, named by what it does; counted and timed; a no-op for a group of one.

Process groups are made once (build_groups) and passed in. Transport per group: shared memory (shm.py)
for CPU groups whose members share a host, NCCL on CUDA, gloo otherwise; `transport` (or env
MESHLM_TRANSPORT: auto | shm | gloo) overrides. Every group keeps its gloo/NCCL group too, for control
messages (broadcast_object, barrier) and for tensors above Comm.shm_max_bytes. A member that dies or goes
quiet fails the others' collective within the timeout, named, on either transport: shm.py's waiters check the
awaited pid; a failed gloo/NCCL op (its peer's sockets closed, or the group timeout) becomes the same
PeerLostError naming the members that exited (pids on this host) or else the members on other hosts.
Statistics (calls, bytes, seconds, transport per op) feed telemetry: `stats()` returns a snapshot. Bytes count
the local payload each rank hands to the op (the input tensor's size).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import secrets
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from meshlm.errors import ConfigError
from meshlm.parallel import shm

TRANSPORTS = ("auto", "shm", "gloo")
LOST_POLL_S = 0.5  # after a failed op, how long to look for the member that exited (its sockets close first)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """Where a group member runs (to name it when it is lost): host name, pid namespace, process id."""

    host: str
    pidns: str
    pid: int


def whoami() -> Member:
    """This process as a group Member."""
    return Member(socket.gethostname(), _pid_namespace(), os.getpid())


@dataclass
class OpStats:
    """Totals for one op on one group."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    transports: set[str] = field(default_factory=set)


@dataclass
class CommStats:
    """Per-(group, op) totals for this process."""

    ops: dict[tuple[str, str], OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    links: dict[tuple[str, int, int], int] = field(default_factory=lambda: defaultdict(int))  # bytes src -> dst

    def record(self, group: str, op: str, nbytes: int, seconds: float, transport: str = "gloo") -> None:
        """Add one call."""
        s = self.ops[(group, op)]
        s.calls += 1
        s.bytes += nbytes
        s.seconds += seconds
        s.transports.add(transport)

    def record_link(self, group: str, src: int, dst: int, nbytes: int) -> None:
        """Add nbytes this process sent from global rank src to dst (all-to-all-v, per link)."""
        self.links[(group, src, dst)] += nbytes

    def link_snapshot(self) -> dict[str, int]:
        """{"group/src->dst": bytes} (a copy)."""
        return {f"{g}/{s}->{d}": b for (g, s, d), b in sorted(self.links.items())}

    def total_seconds(self) -> float:
        """Seconds spent in all collectives."""
        return sum(s.seconds for s in self.ops.values())

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{"group/op": {"calls", "bytes", "seconds", "transport"}} (a copy; "shm+gloo" when mixed)."""
        return {f"{g}/{o}": {"calls": s.calls, "bytes": s.bytes, "seconds": s.seconds,
                             "transport": "+".join(sorted(s.transports))}
                for (g, o), s in self.ops.items()}

    def reset(self) -> None:
        """Forget all totals."""
        self.ops.clear()
        self.links.clear()


STATS = CommStats()


class Comm:
    """Collectives over one process group (global ranks `ranks`); this process is `ranks[index]`."""

    # Tensors above this go over gloo even in a shared-memory group. Unlimited: shm measured faster at every
    # size up to 16 MB (docs/benchmarks.md); it is a knob for machines where that does not hold.
    shm_max_bytes = 1 << 62

    def __init__(self, name: str, ranks: list[int], group: Any, global_rank: int,
                 stats: CommStats = STATS, transport: str = "gloo",
                 shm_group: shm.ShmGroup | None = None, members: list[Member] | None = None) -> None:
        self.name = name
        self.members = members  # by group index; None: unknown (a lost peer is then named by the op's error alone)
        self.ranks = list(ranks)
        self.group = group
        self.size = len(ranks)
        self.index = ranks.index(global_rank) if global_rank in ranks else -1
        self.stats = stats
        self.shm = shm_group
        self.transport = "shm" if shm_group is not None else transport
        self.base = transport  # what the torch.distributed group runs on
        self._posted: list[tuple[Any, torch.Tensor]] = []  # isend() handles and their tensors, until done
        # Set on the control group: how long a broadcast_object's source waits for its receivers (gloo hands a
        # message over only once the receiver has posted for it, so a peer behind a cut link would hold the
        # source for the group's whole timeout); receivers keep the group's own, long timeout.
        self.send_timeout_s: float | None = None

    def _timed(self, op: str, nbytes: int, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kw)
        except shm.PeerLostError:
            raise
        except RuntimeError as e:
            raise self.lost(op, e) from None
        self.stats.record(self.name, op, nbytes, time.perf_counter() - t0, self.base)
        return out

    def lost(self, op: str, err: BaseException) -> BaseException:
        """The error for a failed gloo/NCCL op: a PeerLostError naming the members on this host that exited
        (polled up to LOST_POLL_S: a killed peer's sockets close before it is gone), else the members on other
        hosts; `err` itself when the members are unknown."""
        from meshlm.parallel.launch import other_hosts

        if not self.members:
            return err
        me, who = self.ranks[self.index], self.members
        mine = who[self.index]
        here = [i for i, m in enumerate(who) if i != self.index and (m.host, m.pidns) == (mine.host, mine.pidns)]
        deadline = time.monotonic() + (LOST_POLL_S if here else 0.0)
        while True:
            dead = [i for i in here if not shm.pid_alive(who[i].pid)]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if dead:
            names = ", ".join(f"rank {self.ranks[i]} (pid {who[i].pid})" for i in dead)
            return shm.PeerLostError(f"{names} exited while rank {me} waited for it in {self.name}/{op} over "
                                     f"{self.base}")
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        far = other_hosts([m.host for m in who], self.index, self.ranks)
        return shm.PeerLostError(f"{self.name}/{op} over {self.base} failed on rank {me}: {cause}{far}")

    def _timed_shm(self, op: str, nbytes: int, fn, *args):
        """_timed for a ShmGroup method (the decode path: kept short)."""
        t0 = time.perf_counter()
        out = fn(*args)
        self.stats.record(self.name, op, nbytes, time.perf_counter() - t0, "shm")
        return out

    def _use_shm(self, nbytes: int) -> bool:
        return self.shm is not None and nbytes <= self.shm_max_bytes

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the group, in place; returns t."""
        if self.size == 1:
            return t
        nbytes = t.numel() * t.element_size()
        if self._use_shm(nbytes):
            return self._timed_shm("all_reduce", nbytes, self.shm.all_reduce, t)
        self._timed("all_reduce", nbytes, dist.all_reduce, t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's t along dim; `sizes` gives each rank's length there when uneven."""
        if self.size == 1:
            return t
        dim = dim % t.dim()
        nbytes = t.numel() * t.element_size()
        longest = max(sizes) if sizes else t.shape[dim]
        row = t.element_size() * math.prod(n for i, n in enumerate(t.shape) if i != dim)
        if self._use_shm(row * longest):  # the same choice on every rank, however uneven the parts
            return self._timed_shm("all_gather", nbytes, self.shm.all_gather, t, dim, sizes)
        if t.shape[dim] < longest:  # gloo needs equal sizes: pad, gather, trim
            pad = list(t.shape)
            pad[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._timed("all_gather", nbytes, dist.all_gather, parts, t, group=self.group)
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

    def all_to_all_v(self, t: torch.Tensor, matrix: list[list[int]]) -> torch.Tensor:
        """Rows t [M, ...] grouped by destination member -> the rows sent here [R, ...] grouped by source.

        matrix[i][j] = rows member i sends member j; every member passes the same matrix (all-gather the
        counts first), so bytes moved follow the rows actually sent. Counted per link too (stats.links: bytes
        this rank sent each other member, by global rank)."""
        if self.size == 1:
            return t
        me, row_bytes = self.index, t.element_size() * math.prod(t.shape[1:])
        sent = [n * row_bytes for n in matrix[me]]
        nbytes = sum(sent) - sent[me]
        if self._use_shm(max(sum(r) for r in matrix) * row_bytes):
            out = self._timed_shm("all_to_all_v", nbytes, self.shm.all_to_all_v, t, matrix)
        else:
            out = t.new_empty((sum(r[me] for r in matrix), *t.shape[1:]))
            self._timed("all_to_all_v", nbytes, dist.all_to_all_single, out, t.contiguous(),
                        [r[me] for r in matrix], list(matrix[me]), group=self.group)
        for j, b in enumerate(sent):
            if b and j != me:
                self.stats.record_link(self.name, self.ranks[me], self.ranks[j], b)
        return out

    def broadcast(self, t: torch.Tensor, src_index: int = 0) -> torch.Tensor:
        """Copy t from group member src_index to all members, in place."""
        if self.size == 1:
            return t
        nbytes = t.numel() * t.element_size()
        if self._use_shm(nbytes):
            return self._timed_shm("broadcast", nbytes, self.shm.broadcast, t, src_index)
        self._timed("broadcast", nbytes, dist.broadcast, t, src=self.ranks[src_index], group=self.group)
        return t

    def broadcast_object(self, obj: Any = None, src_index: int = 0) -> Any:
        """Send a small Python object (control messages between our own ranks) from src_index to all."""
        if self.size == 1:
            return obj
        if self.shm is not None:  # pickled through the segment: ~20 us against two gloo broadcasts
            data = pickle.dumps(obj) if self.index == src_index else b""
            data = self._timed_shm("broadcast_object", 0, self.shm.broadcast_bytes, data, src_index)
            return obj if self.index == src_index else pickle.loads(data)
        if self.send_timeout_s is not None:
            return self._timed("broadcast_object", 0, self._broadcast_pickled, obj, src_index)
        box = [obj]
        self._timed("broadcast_object", 0, dist.broadcast_object_list, box, src=self.ranks[src_index],
                    group=self.group)
        return box[0]

    def _broadcast_pickled(self, obj: Any, src_index: int) -> Any:
        """broadcast_object over gloo in two CPU broadcasts (size, bytes); the source waits send_timeout_s."""
        src, mine = self.ranks[src_index], self.index == src_index
        data = pickle.dumps(obj) if mine else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self._wait(dist.broadcast(size, src=src, group=self.group, async_op=True), mine)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if mine else torch.empty(int(size),
                                                                                            dtype=torch.uint8)
        self._wait(dist.broadcast(buf, src=src, group=self.group, async_op=True), mine)
        return obj if mine else pickle.loads(buf.numpy().tobytes())

    def _wait(self, work: Any, bounded: bool) -> None:
        if not bounded:
            work.wait()
            return
        try:
            work.wait(timeout=timedelta(seconds=self.send_timeout_s))
        except RuntimeError as e:
            raise RuntimeError(f"{self.name} group: a member did not take a message within the "
                               f"{self.send_timeout_s:g} s comm timeout ({e})") from None

    def send(self, t: torch.Tensor, dst_index: int) -> None:
        """Point-to-point send to a group member (blocks until the receiver has taken it)."""
        nbytes = t.numel() * t.element_size()
        if self._use_shm(nbytes):
            return self._timed_shm("send", nbytes, self.shm.send, t, dst_index)
        self._timed("send", nbytes, dist.send, t.contiguous(), dst=self.ranks[dst_index], group=self.group)

    def recv(self, t: torch.Tensor, src_index: int) -> torch.Tensor:
        """Receive into t what a group member sent with send(); returns t."""
        nbytes = t.numel() * t.element_size()
        if self._use_shm(nbytes):
            return self._timed_shm("recv", nbytes, self.shm.recv, t, src_index)
        self._timed("recv", nbytes, dist.recv, t, src=self.ranks[src_index], group=self.group)
        return t

    def isend(self, t: torch.Tensor, dst_index: int) -> None:
        """Post t for a group member over the process group; it completes in the background (t is kept alive).

        Never over shared memory: a posted send must not wait for its consumer (pipeline stages post to the
        next stage and the last stage posts back to the first, so a blocking send could close a cycle).
        """
        t0 = time.perf_counter()
        t = t.contiguous()
        self._posted.append((dist.isend(t, dst=self.ranks[dst_index], group=self.group), t))
        if len(self._posted) > 64:
            self._posted = [(w, x) for w, x in self._posted if not w.is_completed()]
        self.stats.record(self.name, "isend", t.numel() * t.element_size(), time.perf_counter() - t0, self.base)

    def recv_posted(self, t: torch.Tensor, src_index: int) -> torch.Tensor:
        """Receive into t what a group member posted with isend() (blocks until it arrives); returns t."""
        self._timed("recv", t.numel() * t.element_size(), dist.recv, t, src=self.ranks[src_index],
                    group=self.group)
        return t

    def wait_posted(self) -> None:
        """Wait until every send this rank posted has completed."""
        for work, _ in self._posted:
            work.wait()
        self._posted.clear()

    def exchange(self, send: torch.Tensor | None, dst_index: int, recv: torch.Tensor | None,
                 src_index: int, op: str = "exchange") -> Exchange:
        """Post a send to dst_index and a receive into `recv` from src_index (empty or None: skipped) over the
        process group; both proceed while the caller computes; Exchange.wait() finishes them."""
        works, nbytes = [], 0
        if send is not None and send.numel():
            send = send.contiguous()
            nbytes = send.numel() * send.element_size()
            works.append(dist.isend(send, dst=self.ranks[dst_index], group=self.group))
        if recv is not None and recv.numel():
            works.append(dist.irecv(recv, src=self.ranks[src_index], group=self.group))
        return Exchange(self, op, nbytes, works, send)

    def gather_object(self, obj: Any, dst_index: int = 0) -> list[Any] | None:
        """Every member's obj, by member, on dst_index (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.index == dst_index else None
        self._timed("gather_object", 0, dist.gather_object, obj, out, dst=self.ranks[dst_index], group=self.group)
        return out

    def barrier(self) -> None:
        """Wait for every member."""
        if self.size > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Unmap the shared-memory segment, if any (the torch.distributed group is left alone)."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None
            self.transport = self.base


@dataclass
class Exchange:
    """Posted point-to-point transfers; wait() blocks until they are done and records the time it blocked
    (the part of the transfer not hidden under the caller's compute)."""

    comm: Comm
    op: str
    nbytes: int
    works: list
    keep: torch.Tensor | None  # the send buffer, alive until done

    def wait(self) -> None:
        """Finish the posted send and receive."""
        t0 = time.perf_counter()
        try:
            for w in self.works:
                w.wait()
        except RuntimeError as e:
            raise self.comm.lost(self.op, e) from None
        self.comm.stats.record(self.comm.name, self.op, self.nbytes, time.perf_counter() - t0, self.comm.base)


@dataclass
class Groups:
    """The communicators one rank takes part in."""

    world: Comm
    tp: Comm
    pp: Comm
    dp: Comm
    cp: Comm | None = None  # context parallelism; None: a group of one

    def close(self) -> None:
        """Unmap every group's shared-memory segment."""
        for c in (self.world, self.tp, self.pp, self.dp, self.cp):
            if c is not None:
                c.close()


def single_process_groups() -> Groups:
    """Groups of one, for running without torch.distributed."""
    one = Comm("single", [0], None, 0)
    return Groups(world=one, tp=one, pp=one, dp=one, cp=one)


def attach_shm(group: Any, ranks: list[int], index: int, name: str, timeout_s: float,
               slot_bytes: int = shm.SLOT_BYTES) -> tuple[shm.ShmGroup | None, str]:
    """Every member calls this: the first creates the segment, the rest map it, then the name is removed.

    Returns (segment, "") when every member mapped it and all share a host, else (None, why not).
    """
    size = len(ranks)
    made, token, seg, why = "", secrets.randbits(62), None, ""
    try:
        if index == 0:
            shm.sweep_stale()  # segments of launches whose creator died before unlinking
            made = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{name}")
            try:
                seg = shm.ShmGroup(made, 0, size, ranks, name, timeout_s, slot_bytes, True, token)
            except OSError as e:
                why = f"rank {ranks[0]} could not create {made}: {e}"
        box = [(made if seg else "", token)]
        dist.broadcast_object_list(box, src=ranks[0], group=group)
        path, token = box[0]
        if index != 0 and path:
            try:
                seg = shm.ShmGroup(path, index, size, ranks, name, timeout_s, slot_bytes, token=token)
            except OSError as e:
                why = f"rank {ranks[index]} could not map {path}: {e}"
        # One host and one pid namespace, or the waiters' liveness checks would look up the wrong pids.
        mine = (socket.gethostname(), _pid_namespace(), os.getpid(), why)
        every: list[Any] = [None] * size
        dist.all_gather_object(every, mine, group=group)  # after this every member has mapped it
    finally:
        if made:
            try:
                os.unlink(made)
            except OSError:
                pass
    whys = [w for *_, w in every if w]
    if not whys and len({(h, ns) for h, ns, _, _ in every}) > 1:
        whys = [f"ranks {ranks} are not all on one host: {sorted({h for h, *_ in every})}"]
    if whys:
        if seg is not None:
            seg.close()
        return None, whys[0]
    assert seg is not None
    seg.pids = [pid for _, _, pid, _ in every]
    return seg, ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def resolve_transport(requested: str | None = None) -> str:
    """The transport asked for: the argument, else $MESHLM_TRANSPORT, else "auto"."""
    name = requested or os.environ.get("MESHLM_TRANSPORT") or "auto"
    if name not in TRANSPORTS:
        raise ConfigError(f"transport {name!r} is unknown; use one of {', '.join(TRANSPORTS)}.")
    return name


def use_transport(comm: Comm, transport: str | None, timeout_s: float) -> Comm:
    """Give a CPU group on one host its shared-memory segment (every member calls this, same order)."""
    transport = resolve_transport(transport)
    if comm.size > 1 and comm.base == "gloo" and transport != "gloo" and shm.supported():
        seg, why = attach_shm(comm.group, comm.ranks, comm.index, comm.name, timeout_s)
        if seg is None and transport == "shm":
            raise ConfigError(f"--transport shm: {why}. Use --transport auto to fall back to gloo.")
        if seg is None:
            log.info("%s group %s: no shared memory (%s); using gloo", comm.name, comm.ranks, why)
        comm.shm, comm.transport = seg, ("shm" if seg is not None else comm.base)
    return comm


def build_groups(dims, rank: int, backend: str, timeout_s: float, transport: str | None = None) -> Groups:
    """Create every named group (all ranks call this in the same order); CPU groups on one host get shm."""
    timeout = timedelta(seconds=timeout_s)
    transport = resolve_transport(transport)
    if transport == "shm" and (backend != "gloo" or not shm.supported()):
        raise ConfigError(f"the shm transport needs CPU tensors (gloo) on x86-64 Linux with /dev/shm; this "
                          f"is {backend} on {os.uname().machine}. Use --transport auto or gloo.")
    label = "nccl" if "nccl" in backend else backend  # "cpu:gloo,cuda:nccl": tensors on NCCL, objects on gloo
    every: list[Any] = [None] * dims.world_size
    dist.all_gather_object(every, whoami())  # each rank's host and pid: a lost one is named by any group
    world = Comm("world", list(range(dims.world_size)), dist.group.WORLD, rank, transport=label, members=every)

    def make(name: str, all_groups: list[list[int]]) -> Comm:
        mine = None
        for ranks in all_groups:
            g = dist.new_group(ranks, backend=backend, timeout=timeout) if len(ranks) > 1 else None
            if rank in ranks:
                mine = Comm(name, ranks, g, rank, transport=label, members=[every[r] for r in ranks])
        assert mine is not None
        return use_transport(mine, transport, timeout_s)

    return Groups(world=world, tp=make("tp", dims.tp_groups()), pp=make("pp", dims.pp_groups()),
                  dp=make("dp", dims.dp_groups()), cp=make("cp", dims.cp_groups()))


# Ranks wait for the next control call on their own group with a long timeout: an idle server is not a stalled
# collective. A dead peer still ends the wait at once (its sockets close; spawned ranks also die with their
# parent), and the collectives inside a call keep the short --comm-timeout.
CONTROL_TIMEOUT_S = 7 * 24 * 3600.0


def build_control_group(world_size: int, rank: int, timeout_s: float, transport: str | None = None,
                        members: list[Member] | None = None) -> Comm:
    """The group that carries the executor's calls from rank 0 (every rank builds it, after build_groups).

    Receivers wait for a call up to CONTROL_TIMEOUT_S; the sender of a call waits up to timeout_s (the comm
    timeout), so a keep-alive ping to a peer behind a cut link fails in bounded time. members: every rank's
    Member (build_groups' world.members), so a failed call names the lost rank.
    """
    ranks = list(range(world_size))
    group = dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
    # Over shared memory when every rank shares this host (a call then costs ~20 us, not ~1 ms of gloo).
    auto = "gloo" if resolve_transport(transport) == "gloo" else "auto"
    comm = Comm("control", ranks, group, rank, members=members)
    comm.send_timeout_s = timeout_s
    return use_transport(comm, auto, CONTROL_TIMEOUT_S)
