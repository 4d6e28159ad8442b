"""Shared-memory collectives: bitwise equal to a reference on every rank, equal to gloo end to end, and a
dead or missing rank fails its peers within the timeout, naming it, with nothing left in /dev/shm."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from functools import reduce

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spawned_ranks import rank_pool, spawn_ranks

from meshlm import LLM, SamplingParams
from meshlm.errors import ConfigError
from meshlm.parallel import shm
from meshlm.parallel.comm import Comm, attach_shm, resolve_transport

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

POOL = 4  # ranks in the pool; groups of 2, 3 and 4 are its first ranks
SLOT = 16 << 10  # small slots so that medium tensors go through in several chunks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inputs(case: dict, n: int) -> list[torch.Tensor]:
    """Every member's input for a case (each rank can rebuild all of them)."""
    out = []
    for r in range(n):
        shape = list(case["shape"])
        if case["op"] == "all_gather":
            shape[case["dim"]] = case["sizes"][r]
        g = torch.Generator().manual_seed(case["seed"] * 64 + r)
        out.append((torch.randn(shape, generator=g) * 10).to(DTYPES[case["dtype"]]))
    return out


def expected(case: dict, xs: list[torch.Tensor]) -> torch.Tensor:
    """The reference: sum in member order (16-bit types in fp32, rounded once), concatenation, or a copy."""
    if case["op"] == "all_reduce":
        acc = xs[0].float() if xs[0].dtype != torch.float32 else xs[0].clone()
        return reduce(lambda a, b: a + b.float(), xs[1:], acc).to(xs[0].dtype)
    if case["op"] == "all_gather":
        return torch.cat(xs, dim=case["dim"])
    return xs[case["src"]].clone()


def run_case(comm: Comm, case: dict) -> str | None:
    """Run one case on this member; a description of the mismatch, or None."""
    if case["op"] == "burst":  # back to back, no driver in between: a broadcast's source races ahead
        g = torch.Generator().manual_seed(case["seed"])
        for i in range(case["count"]):
            op = ["all_reduce", "broadcast", "broadcast_object", "all_gather"][int(torch.randint(4, (1,), generator=g))]
            n = [1, 768, 5000][int(torch.randint(3, (1,), generator=g))]
            sub = {**case, "op": op, "shape": [n], "dim": 0, "sizes": [n] * comm.size, "transposed": False,
                   "src": int(torch.randint(comm.size, (1,), generator=g)), "seed": case["seed"] + i, "nbytes": n}
            if (err := run_case(comm, sub)) is not None:
                return err
        return None
    if case["op"] == "broadcast_object":  # a pickled payload of 0 to ~4 slots
        g = torch.Generator().manual_seed(case["seed"])
        obj = {"seed": case["seed"], "data": torch.randint(0, 256, (case["nbytes"],), generator=g).tolist()}
        got = comm.broadcast_object(obj if comm.index == case["src"] else None, case["src"])
        return None if got == obj else f"rank {comm.index}: {case}: broadcast_object differs"
    xs = inputs(case, comm.size)
    mine = xs[comm.index].clone()
    if case["transposed"] and mine.dim() >= 2 and case["op"] != "all_gather":
        mine = mine.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    if case["op"] == "send_recv":  # member src to the next member; the rest stay out of it
        src, dst = case["src"], (case["src"] + 1) % comm.size
        if comm.index == src:
            comm.send(mine, dst)
        if comm.index != dst:
            return None
        got = comm.recv(torch.empty_like(mine), src)
    elif case["op"] == "all_reduce":
        got = comm.all_reduce(mine)
    elif case["op"] == "all_gather":
        got = comm.all_gather(mine, dim=case["dim"], sizes=case["sizes"])
    else:
        got = comm.broadcast(mine, case["src"])
    want = expected(case, xs)
    if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
        return f"rank {comm.index}: {case}: max diff {(got.float() - want.float()).abs().max()}"
    return None


@pytest.fixture(scope="module")
def pool():
    """POOL spawned ranks; call pool(case) -> the mismatches reported by the case's members."""
    with rank_pool(POOL, run_case, SLOT) as run:
        yield run


@st.composite
def cases(draw, ops: tuple[str, ...]) -> dict:
    """A random collective: op (one of ops), group size, dtype, shape (up to ~20 chunks), data seed."""
    op = draw(st.sampled_from(ops))
    size = draw(st.integers(2, POOL))
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    if draw(st.booleans()):
        shape[-1] = draw(st.sampled_from([768, 4100, 9000]))  # up to ~20 chunks of SLOT bytes
    dim = draw(st.integers(0, len(shape) - 1))
    sizes = draw(st.lists(st.integers(0, 9), min_size=size, max_size=size)) if draw(st.booleans()) else None
    return {"op": op, "size": size, "dtype": draw(st.sampled_from(list(DTYPES))), "shape": shape, "dim": dim,
            "sizes": sizes or [shape[dim]] * size, "src": draw(st.integers(0, size - 1)),
            "transposed": draw(st.booleans()), "seed": draw(st.integers(0, 2**31)),
            "nbytes": draw(st.sampled_from([0, 1, 100, 9000, 30000]))}


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "broadcast"])
def test_collectives_equal_reference_bitwise(pool, op):
    """1000 random cases of each collective (shapes, fp32/bf16, groups of 2-4): every rank gets the reference bits."""
    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases((op,)))
    def check(case):
        assert pool(case) == []

    check()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(("broadcast_object", "send_recv")))
def test_objects_and_point_to_point_equal_reference(pool, case):
    """300 random pickled broadcasts (0 to ~4 slots) and send/recv pairs: received exactly as sent."""
    assert pool(case) == []


def test_back_to_back_mixed_ops(pool):
    """400 mixed collectives in a row per group size, with no pause between them: no op sees stale data."""
    for size in range(2, POOL + 1):
        for dtype in DTYPES:
            assert pool({"op": "burst", "size": size, "dtype": dtype, "seed": 7 * size, "count": 200}) == []


def _fault_rank(rank: int, port: int, conn, timeout_s: float, mode: str) -> None:
    """Three ranks loop all-reduces; in "stall" mode rank 2 never joins. Reports the error and its time."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    seg, why = attach_shm(dist.group.WORLD, [0, 1, 2], rank, "tp", timeout_s)
    assert seg is not None, why
    comm = Comm("tp", [0, 1, 2], dist.group.WORLD, rank, shm_group=seg)
    conn.send(("ready", os.getpid()))
    if mode == "stall" and rank == 2:
        time.sleep(600)
    x = torch.ones(768)
    try:
        while True:
            comm.all_reduce(x.fill_(1.0))
    except shm.PeerLostError as e:
        conn.send(("error", str(e), time.monotonic()))
    os._exit(0)


def _fault_launch(timeout_s: float, mode: str):
    procs, conns = spawn_ranks(3, _fault_rank, timeout_s, mode)
    pids = []
    for c in conns:
        assert c.poll(120), "a rank did not start"
        pids.append(c.recv()[1])
    return procs, conns, pids


def _leftovers(pids: list[int]) -> list[str]:
    return [p for pid in pids for p in glob.glob(f"{shm.SHM_DIR}/{shm.PREFIX}{pid}-*")]


@pytest.mark.parametrize("victim", [2, 0])
def test_rank_killed_mid_collective_is_named_and_shm_is_clean(victim):
    """SIGKILL one of three ranks looping all-reduces (rank 0 made the segment): the others raise naming it,
    well inside the timeout, and nothing of the launch is left in /dev/shm."""
    procs, conns, pids = _fault_launch(30.0, "loop")
    assert not _leftovers(pids), "the segment's name must be gone once every member has mapped it"
    time.sleep(0.5)
    killed = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    for r, c in enumerate(conns):
        if r == victim:
            continue
        assert c.poll(10), "a waiter did not notice the dead rank"
        kind, msg, at = c.recv()
        assert kind == "error" and f"rank {victim}" in msg and "exited" in msg, msg
        assert at - killed < 2.0
    for p in procs:
        p.join(10)
    assert not _leftovers(pids)


def test_missing_rank_times_out_naming_it():
    """A live rank that never joins: the others raise after the collective timeout, naming it."""
    procs, conns, pids = _fault_launch(1.0, "stall")
    start = time.monotonic()
    for c in conns[:2]:
        assert c.poll(10)
        kind, msg, at = c.recv()
        assert kind == "error" and "rank 2" in msg and "timeout" in msg, msg
        assert 0.9 < at - start < 4.0
    procs[2].kill()
    for p in procs:
        p.join(10)
    assert not _leftovers(pids)


def test_stale_segment_of_a_dead_launch_is_swept(tmp_path):
    """A segment left by a creator killed before it could unlink the name goes at the next creation."""
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: its pid names no process now
    stale = f"{shm.SHM_DIR}/{shm.PREFIX}{p.pid}-dead-tp"
    live = f"{shm.SHM_DIR}/{shm.PREFIX}{os.getpid()}-live-tp"
    for path in (stale, live):
        open(path, "wb").close()
    try:
        assert stale in shm.sweep_stale()
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)


def test_transport_names_are_checked(monkeypatch):
    """A bad transport name fails with the choices; the env var is the default."""
    with pytest.raises(ConfigError, match="auto, shm, gloo"):
        resolve_transport("tcp")
    monkeypatch.setenv("MESHLM_TRANSPORT", "gloo")
    assert resolve_transport(None) == "gloo" and resolve_transport("shm") == "shm"


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_generation_identical_over_shm_and_gloo(checkpoint, tp):
    """Greedy tokens at tp=2 and 4 are the same over shared memory and over gloo; stats name the transport."""
    prompts = [[5, 17, 33, 250, 101, 7, 9], [44, 3, 19, 200]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    tokens = {}
    for transport in ("shm", "gloo"):
        with LLM(str(checkpoint("llama_gqa")), tp=tp, progress=False, transport=transport) as llm:
            llm.reset_comm_stats()  # rank 0 is this process: forget the previous launch's totals
            tokens[transport] = [o.token_ids for o in llm.generate(prompts, params)]
            stats = llm.comm_stats()
            assert {s["tp/all_reduce"]["transport"] for s in stats} == {transport}
            assert {i["transport"] for i in llm.rank_info()} == {transport}
    assert tokens["shm"] == tokens["gloo"]
    assert not _leftovers([os.getpid()]), "this process created the tp segment; its name must be gone"
