"""Startup: a rank that starts late still joins under a short collective timeout; one that never starts is named
within the startup timeout; once started, a collective times out after the short collective timeout."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from spawned_ranks import spawn_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _rank(rank: int, port: int, conn, delays: list[float], timeout_s: float, startup_s: float,
          agent_port: int | None = None) -> None:
    """Sleep delays[rank], start as the executor's ranks do (agent_port: as under torchrun, env:// and the
    agent's store on that port); rank 0 then runs an all-reduce that rank 1 skips."""
    import torch
    import torch.distributed as dist

    from meshlm.parallel.launch import RankFailure, RendezvousInfo, init_distributed, startup_done

    time.sleep(delays[rank])
    init = f"tcp://127.0.0.1:{port}"
    if agent_port is not None:
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(agent_port))
        init = "env://"
    rv = RendezvousInfo(rank, len(delays), init, "gloo", timeout_s, startup_s)
    t0 = time.monotonic()
    try:
        hosts = init_distributed(rv)
    except RankFailure as e:
        conn.send(("failed", str(e), time.monotonic() - t0))
        conn.poll(60)  # rank 0 serves the store: it stays until the test has every report
        os._exit(0)
    dist.barrier()  # the ready barrier, still under the startup timeout
    startup_done(rv)
    conn.send(("joined", hosts, time.monotonic() - t0))
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            conn.send(("completed", "", 0.0))
        except RuntimeError as e:
            conn.send(("timed out", str(e), time.monotonic() - t0))
    conn.recv()  # until the test is done with every rank
    os._exit(0)


@pytest.mark.parametrize(("init", "late"), [("tcp", 1), ("torchrun", 0), ("torchrun", 1)])
def test_late_rank_joins_under_a_short_comm_timeout(init, late):
    """--comm-timeout 1 and a rank that starts 4 s after the other, locally spawned (tcp://, rank 0 serves the
    store) or as under torchrun (env://, the agent's store): both join (the startup timeout is 60 s); afterwards
    a collective that a peer skips fails after the 1 s collective timeout, not the startup one."""
    import torch.distributed as dist

    from meshlm.parallel.launch import free_port

    agent_port, agent = None, None
    if init == "torchrun":  # the agent's store, which torchrun's ranks reach as clients
        agent_port = free_port()
        agent = dist.TCPStore("127.0.0.1", agent_port, 1, True, timedelta(seconds=60), wait_for_workers=False)
    delays = [4.0 if r == late else 0.0 for r in range(2)]
    procs, conns = spawn_ranks(2, _rank, delays, 1.0, 60.0, agent_port)
    try:
        joined = [c.recv() if c.poll(120) else ("no answer",) for c in conns]
        assert [j[0] for j in joined] == ["joined", "joined"], joined
        assert joined[1 - late][2] > 3.0, "the first rank should have waited for the late one"
        assert conns[0].poll(30), "the all-reduce rank 1 skipped did not time out"
        kind, _, waited = conns[0].recv()
        assert kind == "timed out" and 0.9 < waited < 5.0, (kind, waited)
    finally:
        for c in conns:
            c.send(None)
        for p in procs:
            p.join(10)
        del agent


def test_rank_that_never_starts_is_named_within_the_startup_timeout():
    """Ranks 0 and 1 of 3 started, rank 2 never: both fail after the startup timeout (3 s here), naming rank 2
    and the fix."""
    procs, conns = spawn_ranks(3, _rank, [0.0, 0.0, 600.0], 1.0, 3.0)
    try:
        for c in conns[:2]:
            assert c.poll(60), "a started rank hung"
            kind, msg, waited = c.recv()
            assert kind == "failed" and "rank 2 of 3 did not join within 3 s" in msg and "torchrun" in msg, msg
            assert 2.9 < waited < 10.0, waited
    finally:
        procs[2].kill()
        for c in conns[:2]:
            c.send(None)
        for p in procs:
            p.join(10)
