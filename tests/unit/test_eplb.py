"""Expert load balancing without ranks: the placement algorithm's invariants (hypothesis) and the load window."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlm.errors import ConfigError
from meshlm.parallel.eplb import balance, moved, rank_loads, rebalance
from meshlm.parallel.expert import ExpertLoad, Placement


@st.composite
def cases(draw):
    """(current placement, load per expert, slots per rank, redundant copies)."""
    ranks = draw(st.integers(1, 5))
    experts = draw(st.integers(ranks, 12))
    base = -(-experts // ranks)
    caps = base + draw(st.integers(0, 3))
    skew = draw(st.sampled_from(["uniform", "zipf", "zeros"]))
    raw = draw(st.lists(st.integers(0, 1000), min_size=experts, max_size=experts))
    load = [0] * experts if skew == "zeros" else (
        raw if skew == "uniform" else [r * 50 // (i + 1) for i, r in enumerate(raw)])
    redundant = draw(st.integers(0, ranks * caps))
    current = Placement.contiguous(experts, ranks)
    if draw(st.booleans()):  # start from an earlier rebalance (with replicas) under another load
        current = rebalance(current, draw(st.permutations(load)), caps, redundant)
    return current, load, caps, redundant


@settings(max_examples=300, deadline=None)
@given(cases())
def test_rebalance_invariants(case):
    """Every expert on some rank (Placement checks it), never two copies on a rank, every rank within its
    slot budget, the max rank load never above the current one, and a second pass with the same load moves
    nothing."""
    current, load, caps, redundant = case
    new = rebalance(current, load, caps, redundant)
    assert {e for rank in new.slots for e in rank} == set(range(current.num_experts))
    assert all(len(set(rank)) == len(rank) for rank in new.slots)
    assert all(len(rank) <= caps for rank in new.slots)
    assert sum(len(r) for r in new.slots) <= current.num_experts + redundant
    assert max(rank_loads(new, load)) <= max(rank_loads(current, load)) + 1e-6
    again = rebalance(new, load, caps, redundant)
    assert again == new and moved(new, again) == 0


def test_skewed_load_gets_replicas_and_better_balance():
    """One hot expert: it is copied onto the other rank and the max / mean rank load drops."""
    current = Placement.contiguous(4, 2)  # (0, 1), (2, 3)
    load = [900, 30, 40, 30]
    assert balance(current, load) == pytest.approx(930 / 500)
    new = rebalance(current, load, caps=3, redundant=2)
    assert len(new.replicas(0)) == 2
    assert balance(new, load) < 1.1
    assert moved(current, new) <= 2  # only what needed to move: expert 0's copy (and at most one swap)


def test_unchanged_load_moves_nothing_and_even_load_keeps_contiguous():
    current = Placement.contiguous(8, 4)
    assert rebalance(current, [10] * 8, caps=2, redundant=0) == current
    assert rebalance(current, [10] * 8, caps=3, redundant=4) == current  # replicas would not lower the max


def test_rebalance_refuses_too_few_slots():
    with pytest.raises(ConfigError, match=r"cannot hold 8 experts; raise the slots per rank to at least 4"):
        rebalance(Placement.contiguous(8, 2), [1] * 8, caps=3, redundant=0)


def test_load_window_keeps_the_last_steps():
    """Each forward records every layer once: a repeated layer opens a step; only `window` steps are kept."""
    load = ExpertLoad(window=2)
    expert_of = torch.tensor([[0, 1], [2, 3]])
    for step in range(3):
        for layer in (0, 1):
            every = torch.zeros(2, 2, 2, dtype=torch.long)
            every[0, 0, 0] = step + 1  # step s: s + 1 rows to expert 0
            load.record(layer, every, 0, expert_of, 4, None)
    assert len(load.steps) == 2
    assert load.window_routed()[0].tolist() == [2 + 3, 0, 0, 0]
    assert load.routed[1].tolist() == [1 + 2 + 3, 0, 0, 0]
    load.reset()
    assert not load.routed and load.window_routed()[1].tolist() == [5, 0, 0, 0]


def test_balancer_flags_need_ep():
    from meshlm.engine.worker import WorkerSpec
    from meshlm.parallel.eplb import BalancerSpec
    from meshlm.parallel.mesh import ParallelDims

    with pytest.raises(ConfigError, match=r"need --ep > 1"):
        WorkerSpec(balancer=BalancerSpec(redundant=2))
    WorkerSpec(dims=ParallelDims(ep=2, pp=2), balancer=BalancerSpec(interval=4))  # each stage its own layers
    with pytest.raises(ConfigError, match=r"give counts >= 0"):
        BalancerSpec(redundant=-1)
