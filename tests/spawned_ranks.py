"""Rank processes for collective tests: spawned on one host, meeting over gloo on a free port.

    procs, conns = spawn_ranks(3, target, *args)   # target(rank, port, conn, *args) in each process
    with rank_pool(4, run_case) as pool:           # pool(case) -> the mismatches its members report

A pool's members keep serving cases until it closes: one spawn for every example a property test draws.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def spawn_ranks(n: int, target: Callable, *args) -> tuple[list, list]:
    """Start target(rank, port, conn, *args) in n spawned processes; (processes, the parent ends of their pipes)."""
    from meshlm.parallel.launch import free_port

    ctx = mp.get_context("spawn")
    port, conns, procs = free_port(), [], []
    for r in range(n):
        a, b = ctx.Pipe()
        procs.append(ctx.Process(target=target, args=(r, port, b, *args), daemon=True))
        procs[-1].start()
        conns.append(a)
    return procs, conns


def pool_member(rank: int, port: int, conn, size: int, run_case: Callable, slot_bytes: int) -> None:
    """A pool member: gloo world of `size`; for the groups of its first 2..size ranks a Comm over shared memory
    and one over gloo; answers run_case(comm, case) for each case from conn (None where it is not a member)."""
    import torch
    import torch.distributed as dist

    from meshlm.parallel.comm import Comm, attach_shm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    comms = {}
    for n in range(2, size + 1):
        ranks = list(range(n))
        g = dist.new_group(ranks)
        if rank < n:
            seg, why = attach_shm(g, ranks, rank, f"pool{n}", 30.0, slot_bytes=slot_bytes)
            assert seg is not None, why
            comms[(n, "shm")] = Comm(f"s{n}", ranks, g, rank, shm_group=seg)
            comms[(n, "gloo")] = Comm(f"g{n}", ranks, g, rank)
    conn.send("ready")
    while (case := conn.recv()) is not None:
        try:
            key = (case["size"], case.get("transport", "shm"))
            conn.send(run_case(comms[key], case) if key in comms else None)
        except Exception as e:  # report, keep serving
            conn.send(f"rank {rank}: {case}: {e!r}")
    os._exit(0)


@contextmanager
def rank_pool(size: int, run_case: Callable, slot_bytes: int) -> Iterator[Callable[[dict], list[str]]]:
    """`size` pool members; the pool(case) it yields sends case (its "size" members, "transport" shm by default)
    to every member and returns the mismatches they report."""
    procs, conns = spawn_ranks(size, pool_member, size, run_case, slot_bytes)
    for c in conns:
        assert c.poll(120), "a pool rank did not start"
        assert c.recv() == "ready"

    def run(case: dict) -> list[str]:
        for c in conns:
            c.send(case)
        return [m for c in conns if (m := c.recv())]

    try:
        yield run
    finally:
        for c in conns:
            c.send(None)
        for p in procs:
            p.join(10)
