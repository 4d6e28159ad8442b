"""All-to-all-v (expert parallelism's dispatch and combine): equal to a reference over shared memory and over
gloo for random row counts (zeros included), 2-4 ranks, fp32 and bf16; a rank killed mid-exchange fails the
others within the timeout, naming it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spawned_ranks import rank_pool, spawn_ranks

from meshlm.parallel import shm
from meshlm.parallel.comm import Comm

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

POOL = 4
SLOT = 16 << 10  # small slots: large exchanges go through in several rounds
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rows_for(case: dict, src: int, dst: int) -> torch.Tensor:
    """The rows member src sends member dst (every member can rebuild them)."""
    g = torch.Generator().manual_seed(case["seed"] * 64 + src * 8 + dst)
    n = case["matrix"][src][dst]
    return (torch.randn((n, *case["row"]), generator=g) * 10).to(DTYPES[case["dtype"]])


def run_case(comm: Comm, case: dict) -> str | None:
    """One exchange on this member; a description of the mismatch, or None."""
    me, n = comm.index, comm.size
    t = torch.cat([rows_for(case, me, j) for j in range(n)])
    got = comm.all_to_all_v(t, case["matrix"])
    want = torch.cat([rows_for(case, i, me) for i in range(n)])
    if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
        return f"rank {me} over {comm.transport}: {case}: got {tuple(got.shape)}, want {tuple(want.shape)}"
    return None


@pytest.fixture(scope="module")
def pool():
    """POOL spawned ranks (one spawn for every example); pool(case) -> the mismatches its members report."""
    with rank_pool(POOL, run_case, SLOT) as run:
        yield run


@st.composite
def cases(draw) -> dict:
    """A random exchange: group size, counts matrix (zeros likely), row shape (up to ~10 rounds), dtype."""
    size = draw(st.integers(2, POOL))
    counts = st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 40))
    matrix = [[draw(counts) for _ in range(size)] for _ in range(size)]
    row = draw(st.sampled_from([(1,), (7,), (64,), (3, 33)]))
    return {"size": size, "matrix": matrix, "row": row, "dtype": draw(st.sampled_from(list(DTYPES))),
            "transport": draw(st.sampled_from(["shm", "gloo"])), "seed": draw(st.integers(0, 2**31))}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_all_to_all_v_equals_reference(pool, case):
    """Random counts (zeros included), 2-4 ranks, fp32 and bf16, shm and gloo: every rank gets exactly the
    rows addressed to it, grouped by source."""
    assert pool(case) == []


def test_all_to_all_v_edges(pool):
    """Nothing sent at all; everything to one rank; exchanges larger than a slot (several rounds)."""
    for n in range(2, POOL + 1):
        for transport in ("shm", "gloo"):
            for matrix in ([[0] * n for _ in range(n)], [[0] * (n - 1) + [50] for _ in range(n)],
                           [[200 * (i + j) for j in range(n)] for i in range(n)]):
                case = {"size": n, "matrix": matrix, "row": (48,), "dtype": "bfloat16", "transport": transport,
                        "seed": n}
                assert pool(case) == []


def _fault_rank(rank: int, port: int, conn, transport: str) -> None:
    """Three ranks (one group, built as the engine builds its groups) loop all-to-all-v until a peer disappears."""
    import torch.distributed as dist

    from meshlm.parallel.comm import build_groups
    from meshlm.parallel.mesh import ParallelDims

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    comm = build_groups(ParallelDims(tp=3, world_size=3), rank, "gloo", 30.0, transport).tp
    assert comm.transport == transport
    conn.send(("ready", os.getpid()))
    matrix = [[3, 0, 5], [1, 2, 0], [4, 4, 4]]
    x = torch.ones(sum(matrix[rank]), 256)
    try:
        while True:
            comm.all_to_all_v(x, matrix)
    except shm.PeerLostError as e:
        conn.send(("error", str(e), time.monotonic()))
    conn.poll(30)  # stay alive until the test has every report (an exited waiter would be named as lost too)
    os._exit(0)


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_rank_killed_mid_all_to_all_is_named(transport):
    """SIGKILL one of three ranks looping all-to-all-v, over shared memory or gloo (other hosts' path): the
    others raise within 2 s, naming it."""
    procs, conns = spawn_ranks(3, _fault_rank, transport)
    pids = []
    for c in conns:
        assert c.poll(120), "a rank did not start"
        pids.append(c.recv()[1])
    time.sleep(0.5)
    killed = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    for r in (0, 2):
        assert conns[r].poll(10), "a waiter did not notice the dead rank"
        kind, msg, at = conns[r].recv()
        assert kind == "error" and f"rank 1 (pid {pids[1]}) exited" in msg and "all_to_all_v" in msg, msg
        assert {"shm": "over shared memory", "gloo": "over gloo"}[transport] in msg, msg
        assert at - killed < 2.0
    for c in conns:
        c.close()
    for p in procs:
        p.join(10)
