"""Same-host collectives over one shared-memory segment per process group (x86-64 Linux).

Segment (a file in /dev/shm, made by the group's first member and unlinked as soon as every member has
mapped it, so nothing of a launch stays behind even after a crash):

    header  int64 cells, each counter on its own 64-byte line: line 0 = magic, token, members, slot bytes;
            seq[r] = collective chunks member r has published; sent[i, j] / taken[i, j] = point-to-point
            chunks i wrote for j / j has read
    slots   [N members][2 parities][slot bytes]: collective chunk k uses parity k % 2
    pairs   [N][N][2][slot bytes]: point-to-point slots i -> j (pages never touched cost nothing)

Collective chunk k, on every member in the same order: wait until every seq >= k - 1 (each member has
left chunk k - 2, so the slots of parity k % 2 are free; usually already true), write own part into slot
(me, k % 2), publish seq[me] = k, wait until the seq of every member whose part it reads is >= k, read.
One wait per chunk, and a broadcast's source does not wait for its readers. x86-64 keeps stores in
program order and loads in program order (TSO), so data written before the seq store is visible to whoever
sees the seq store; `supported()` is false elsewhere. Sums run in member order 0..N-1 (16-bit types
accumulate in fp32), so every member gets the same bits.

Waiting spins briefly, then yields, then sleeps; every CHECK_S it checks that the awaited member's process
is alive and that the collective timeout has not passed, and raises PeerLostError naming it otherwise.
"""

from __future__ import annotations

import glob
import math
import mmap
import os
import platform
import time

import torch

from meshlm.errors import MeshlmError

SHM_DIR = "/dev/shm"
PREFIX = "meshlm-"
MAGIC = 0x6D65_7368_6C6D_0001
LINE = 8  # int64 cells per 64-byte cache line
PAGE = 4096
SLOT_BYTES = 1 << 20  # per member and parity; larger messages go through in chunks
SPIN_ITERS = 3000  # ~200 us of pure spinning (about 60 ns a probe) before yielding the core
YIELD_S = 2e-3  # then sched_yield until this long, then short sleeps
SLEEP_S, SLEEP_MAX_S = 50e-6, 5e-3  # then sleeps of 5% of the time waited so far, within these bounds
CHECK_S = 0.05  # how often a waiter checks the awaited process and the deadline
LOW_PRECISION = (torch.bfloat16, torch.float16)
Shape = int | torch.Size  # an int n means (n,)


class PeerLostError(MeshlmError, RuntimeError):
    """A group member died or missed the collective timeout (either transport, comm.Comm.lost); the message
    names it."""


def supported() -> bool:
    """True where the ordering argument above holds (x86-64 Linux with /dev/shm)."""
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR)


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def sweep_stale() -> list[str]:
    """Unlink segments whose creator (the pid in the name) is gone; returns the paths removed."""
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, PREFIX + "*")):
        try:
            pid = int(os.path.basename(path)[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


class ShmGroup:
    """The mapped segment of one group, seen from member `index`; ops must be called in the same order.

    comm.attach_shm() makes one per group: member 0 creates the file, the others map it, then it is unlinked.
    """

    def __init__(self, path: str, index: int, size: int, ranks: list[int], name: str, timeout_s: float,
                 slot_bytes: int = SLOT_BYTES, create: bool = False, token: int = 0) -> None:
        self.index, self.size, self.ranks, self.name = index, size, ranks, name
        self.pids: list[int] = []  # set by attach_shm(); a waiter checks the awaited member's pid
        self.timeout_s, self.slot_bytes = timeout_s, slot_bytes
        self.header = math.ceil(LINE * (1 + size + 2 * size * size) * 8 / PAGE) * PAGE
        total = self.header + (2 * size + 2 * size * size) * slot_bytes
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, total)
            self.mm = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self.cells = memoryview(self.mm)[: self.header].cast("q")
        self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.views: dict[tuple[int, Shape, torch.dtype], torch.Tensor] = {}
        self.slot_lists: dict[tuple[int, torch.Size, torch.dtype], list[torch.Tensor]] = {}
        if create:
            self.cells[1], self.cells[2], self.cells[3] = token, size, slot_bytes
            self.cells[0] = MAGIC
        elif tuple(self.cells[:4]) != (MAGIC, token, size, slot_bytes):
            self.close()
            raise OSError(f"{path} is not this group's segment")
        self.seq = [LINE * (1 + r) for r in range(size)]
        self.k = 0  # collective chunks this member has published
        self.sent = [0] * size  # point-to-point chunks written to / read from each member
        self.taken = [0] * size
        # More members than cores: a spinning waiter would hold the core its peer needs; yield soon.
        self.spin = SPIN_ITERS if size <= len(os.sched_getaffinity(0)) else SPIN_ITERS // 30

    # -- layout ---------------------------------------------------------------------------------------
    def _pair_cell(self, kind: int, i: int, j: int) -> int:
        """Cell of sent[i, j] (kind 0) or taken[i, j] (kind 1)."""
        return LINE * (1 + self.size + (kind * self.size + i) * self.size + j)

    def _view(self, offset: int, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of shape at byte offset (cached: making a view costs more than a 3 KB copy into it)."""
        key = (offset, shape, dtype)
        v = self.views.get(key)
        if v is None:
            if len(self.views) > 1024:
                self.views.clear()
            n = shape if isinstance(shape, int) else math.prod(shape)
            v = self.bytes[offset: offset + n * dtype.itemsize].view(dtype)
            v = self.views[key] = v if isinstance(shape, int) else v.view(shape)
        return v

    def _slot(self, member: int, k: int, n: Shape, dtype: torch.dtype) -> torch.Tensor:
        return self._view(self.header + (2 * member + k % 2) * self.slot_bytes, n, dtype)

    def _slots(self, k: int, shape: torch.Size, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every member's slot of chunk k as a tensor of shape (cached: one lookup per decode all-reduce)."""
        key = (k % 2, shape, dtype)
        v = self.slot_lists.get(key)
        if v is None:
            if len(self.slot_lists) > 256:
                self.slot_lists.clear()
            v = self.slot_lists[key] = [self._slot(m, k, shape, dtype) for m in range(self.size)]
        return v

    def _pair_slot(self, i: int, j: int, c: int, n: Shape, dtype: torch.dtype) -> torch.Tensor:
        base = self.header + 2 * self.size * self.slot_bytes
        return self._view(base + (2 * (i * self.size + j) + c % 2) * self.slot_bytes, n, dtype)

    # -- synchronisation --------------------------------------------------------------------------------
    def _wait(self, cell: int, k: int, member: int, op: str) -> None:
        """Return once cells[cell] >= k; member is the group member expected to write it."""
        c = self.cells
        if c[cell] >= k:
            return
        for _ in range(self.spin):
            if c[cell] >= k:
                return
        start = time.monotonic()
        check_at, deadline = start + CHECK_S, start + self.timeout_s
        while c[cell] < k:
            now = time.monotonic()
            if now - start < YIELD_S:
                os.sched_yield()
            else:  # an idle member (waiting for the next call) wakes 200 times a second
                time.sleep(min(SLEEP_MAX_S, max(SLEEP_S, 0.05 * (now - start))))
            if now >= check_at:
                check_at = now + CHECK_S
                self._check(member, op, now >= deadline)

    def _check(self, member: int, op: str, late: bool) -> None:
        rank, pid, me = self.ranks[member], self.pids[member] if self.pids else 0, self.ranks[self.index]
        if pid and not pid_alive(pid):
            raise PeerLostError(f"rank {rank} (pid {pid}) exited while rank {me} waited for it in "
                                f"{self.name}/{op} over shared memory")
        if late:
            raise PeerLostError(f"rank {rank} (pid {pid}) did not reach {self.name}/{op} within the "
                                f"collective timeout ({self.timeout_s:g} s); rank {me} gave up waiting")

    def _ready(self, op: str) -> int:
        """The next chunk number k, once every member has published k - 1 (slots of parity k % 2 free)."""
        k = self.k + 1
        for m in range(self.size):
            if m != self.index:
                self._wait(self.seq[m], k - 1, m, op)
        return k

    def _sync(self, op: str, k: int, src: int | None = None) -> int:
        """Publish chunk k, then wait for every member to publish it (or only src, unless we are src)."""
        self.k = k
        self.cells[self.seq[self.index]] = k
        for m in range(self.size) if src is None else (() if src == self.index else (src,)):
            if m != self.index:
                self._wait(self.seq[m], k, m, op)
        return k

    # -- collectives --------------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the group in member order, in place; returns t."""
        if t.numel() * t.element_size() <= self.slot_bytes and t.is_contiguous():  # the decode case
            k = self._ready("all_reduce")
            slots = self._slots(k, t.shape, t.dtype)
            slots[self.index].copy_(t)
            self._sync("all_reduce", k)
            return sum_in_order(slots, t)
        flat = _flat(t)
        for part in _chunks(flat, self.slot_bytes // t.element_size()):
            m = part.numel()
            k = self._ready("all_reduce")
            self._slot(self.index, k, m, t.dtype).copy_(part)
            self._sync("all_reduce", k)
            sum_in_order([self._slot(r, k, m, t.dtype) for r in range(self.size)], part)
        return _unflat(t, flat)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Copy t from member src to every member, in place; returns t."""
        flat = _flat(t)
        for part in _chunks(flat, self.slot_bytes // t.element_size()):
            k = self._ready("broadcast")
            if self.index == src:
                self._slot(src, k, part.numel(), t.dtype).copy_(part)
            self._sync("broadcast", k, src)
            if self.index != src:
                part.copy_(self._slot(src, k, part.numel(), t.dtype))
        return _unflat(t, flat)

    def all_gather(self, t: torch.Tensor, dim: int, sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every member's t along dim; sizes[r] is member r's length there (default: equal)."""
        flat = _flat(t)
        shapes = [t.shape] * self.size if sizes is None else [
            torch.Size((*t.shape[:dim], s, *t.shape[dim + 1:])) for s in sizes]
        counts = [math.prod(s) for s in shapes]
        per = self.slot_bytes // t.element_size()
        if max(counts) <= per:  # one chunk: concatenate straight from the slots
            k = self._ready("all_gather")
            self._slot(self.index, k, counts[self.index], t.dtype).copy_(flat)
            self._sync("all_gather", k)
            return torch.cat([self._slot(r, k, shapes[r], t.dtype) for r in range(self.size)], dim=dim)
        outs = [torch.empty(n, dtype=t.dtype) for n in counts]
        for a in range(0, max(counts), per):
            mine = max(0, min(per, counts[self.index] - a))
            k = self._ready("all_gather")
            self._slot(self.index, k, mine, t.dtype).copy_(flat[a: a + mine])
            self._sync("all_gather", k)
            for r, n in enumerate(counts):
                if (m := max(0, min(per, n - a))):
                    outs[r][a: a + m].copy_(self._slot(r, k, m, t.dtype))
        return torch.cat([o.view(s) for o, s in zip(outs, shapes)], dim=dim)

    def all_to_all_v(self, t: torch.Tensor, matrix: list[list[int]]) -> torch.Tensor:
        """Rows t [M, ...] grouped by destination -> rows received [R, ...] grouped by source; matrix[i][j] is
        the rows member i sends member j (the same matrix on every member). Each member writes its whole buffer
        into its slot (in rounds of a slot when larger) and every member copies out the part addressed to it."""
        me, row = self.index, math.prod(t.shape[1:])
        flat = _flat(t)
        sends = [sum(r) * row for r in matrix]  # elements each member writes
        starts = [sum(matrix[m][:me]) * row for m in range(self.size)]  # where my part begins in m's buffer
        lens = [matrix[m][me] * row for m in range(self.size)]
        out = torch.empty((sum(matrix[m][me] for m in range(self.size)), *t.shape[1:]), dtype=t.dtype)
        out_flat, at = out.view(-1), [sum(lens[:m]) for m in range(self.size)]
        per = self.slot_bytes // t.element_size()
        for a in range(0, max(1, max(sends)), per):
            k = self._ready("all_to_all_v")
            mine = flat[a: a + per]
            if mine.numel():
                self._slot(me, k, mine.numel(), t.dtype).copy_(mine)
            self._sync("all_to_all_v", k)
            for m in range(self.size):
                lo, hi = max(starts[m], a), min(starts[m] + lens[m], a + per)
                if hi > lo:
                    src = self._slot(m, k, hi - a, t.dtype)[lo - a:]
                    out_flat[at[m] + lo - starts[m]: at[m] + hi - starts[m]].copy_(src)
        return out

    def broadcast_bytes(self, data: bytes, src: int) -> bytes:
        """Bytes from member src to every member (the others pass b""): an 8-byte length, then the data."""
        parts, n, pos = [], -1, 0
        while n < 0 or pos < n:
            k = self._ready("broadcast_object")
            off = self.header + (2 * src + k % 2) * self.slot_bytes
            head = 8 if n < 0 else 0
            if self.index == src:
                piece = data[pos: pos + self.slot_bytes - head]
                piece = (len(data).to_bytes(8, "little") + piece) if head else piece
                self.mm[off: off + len(piece)] = piece
            self._sync("broadcast_object", k, src)
            if n < 0:
                n = int.from_bytes(self.mm[off: off + 8], "little")
            m = min(self.slot_bytes - head, n - pos)
            if self.index != src:
                parts.append(self.mm[off + head: off + head + m])
            pos += m
        return data if self.index == src else b"".join(parts)

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Write t for member dst (returns once the last chunk is in its slot, two chunks ahead at most)."""
        for part in _chunks(_flat(t), self.slot_bytes // t.element_size()):
            c = self.sent[dst] + 1
            self._wait(self._pair_cell(1, self.index, dst), c - 2, dst, "send")  # slot c % 2 is free
            self._pair_slot(self.index, dst, c, part.numel(), t.dtype).copy_(part)
            self.cells[self._pair_cell(0, self.index, dst)] = self.sent[dst] = c

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Read what member src sent into t; returns t."""
        flat = _flat(t)
        for part in _chunks(flat, self.slot_bytes // t.element_size()):
            c = self.taken[src] + 1
            self._wait(self._pair_cell(0, src, self.index), c, src, "recv")
            part.copy_(self._pair_slot(src, self.index, c, part.numel(), t.dtype))
            self.cells[self._pair_cell(1, src, self.index)] = self.taken[src] = c
        return _unflat(t, flat)

    def barrier(self) -> None:
        """Wait for every member."""
        self._sync("barrier", self._ready("barrier"))

    def close(self) -> None:
        """Drop the mapping (the name is already gone from /dev/shm)."""
        self.views.clear()
        self.slot_lists.clear()
        self.bytes = None  # type: ignore[assignment]
        self.cells.release()
        try:
            self.mm.close()
        except BufferError:  # a view into the segment is still alive; the mapping goes with it
            pass


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t as a 1-D tensor: a view when contiguous, else a copy (written back by _unflat)."""
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _unflat(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        t.copy_(flat.view(t.shape))
    return t


def _chunks(flat: torch.Tensor, per: int):
    """Consecutive pieces of at most per elements (one piece, possibly empty, when it fits)."""
    n = flat.numel()
    if n <= per:
        yield flat
        return
    for a in range(0, n, per):
        yield flat[a: a + per]


def sum_in_order(parts: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out = ((parts[0] + parts[1]) + parts[2]) + ...; 16-bit types accumulate in fp32 and round once."""
    if len(parts) == 2:
        return torch.add(parts[0], parts[1], out=out)
    if out.dtype in LOW_PRECISION:
        acc = parts[0].float()
        for p in parts[1:]:
            acc.add_(p)
        return out.copy_(acc)
    torch.add(parts[0], parts[1], out=out)
    for p in parts[2:]:
        out.add_(p)
    return out
