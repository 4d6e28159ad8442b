"""The speculation policy's probes, catch-up charge and pipelined cost samples, on injected costs and acceptances."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import CatchUpProposer, FakeClock, decoding_request

from meshlm.config import SamplingParams
from meshlm.engine.spec_engine import Speculator
from meshlm.engine.spec_policy import PROBE_EVERY, PROBE_MAX, SpecPolicy
from meshlm.engine.speculative import SpeculativeConfig


def fitted(a: float, b: float, d: float = 0.0, k_max: int = 4) -> SpecPolicy:
    """A policy whose step cost a + b*T and proposer cost d per proposed token are measured at several sizes."""
    pol = SpecPolicy(k_max)
    for t in (1, 5, 1, 5, 9, 1):
        pol.observe_step(t, a + b * t)
        pol.observe_propose(t, d * t)
    return pol


def probe_steps(pol: SpecPolicy, ids: list[str], steps: int, **kw) -> list[int]:
    """The steps (0-based) at which some request proposed; every proposal of 4 is rejected outright."""
    at = []
    for s in range(steps):
        ks = pol.choose(ids, [4] * len(ids), [False] * len(ids), **kw)
        for rid, k in zip(ids, ks):
            if k:
                pol.observe_verify(rid, k, 0)
        if any(ks):
            at.append(s)
    return at


def test_probes_back_off_exponentially_while_they_find_no_gain():
    """Rows nearly free (a sure acceptance would pay) but every proposal rejected: one probe after PROBE_EVERY
    quiet steps, the next after twice as many, and so on; all probes together stay a vanishing share of steps."""
    pol = fitted(0.010, 0.0005)
    ids = [f"r{i}" for i in range(4)]
    for rid in ids:
        pol.observe_verify(rid, 4, 0)
    at = probe_steps(pol, ids, 2000)
    gaps = [b - a for a, b in zip([-1] + at, at)]
    assert gaps[:4] == [PROBE_EVERY + 1, 2 * PROBE_EVERY + 1, 4 * PROBE_EVERY + 1, 8 * PROBE_EVERY + 1], at
    assert max(gaps) <= PROBE_MAX + 1 and len(at) <= 9


def test_probe_interval_resets_once_speculation_pays():
    """After backing off, a request whose proposals are accepted makes the policy speculate on its own, and the
    probe interval is back to PROBE_EVERY."""
    pol = fitted(0.010, 0.0005)
    ids = [f"r{i}" for i in range(4)]
    probe_steps(pol, ids, 200)
    assert pol.probe_every > PROBE_EVERY
    for _ in range(40):
        pol.observe_verify("r0", 4, 4)
    assert pol.choose(ids, [4] * 4, [False] * 4)[0] == 4
    assert pol.probe_every == PROBE_EVERY


def test_probe_picks_the_request_cheapest_to_catch_up_on():
    """A probe goes to a request the proposer already holds rather than one whose whole prompt it would take in."""
    pol = fitted(0.010, 0.0005, d=0.0001)
    pol.observe_catch_up(100, 0.1)  # 1 ms a token caught up on
    ids = ["long", "held", "short"]
    for rid in ids:
        pol.observe_verify(rid, 4, 0)
    ks = [pol.choose(ids, [4] * 3, [False] * 3, backlog=[600, 1, 40], left=[1000] * 3)
          for _ in range(PROBE_EVERY + 1)]
    assert ks[-1] == [0, 4, 0] and not any(map(any, ks[:-1]))


def test_catch_up_is_charged_over_the_tokens_a_request_has_left():
    """Batch 1, flat step, good acceptance: a request the proposer must first catch up on (its prompt) still
    speculates when it has many tokens left, but not in its last steps, where the catch-up cannot pay back."""
    pol = fitted(0.010, 0.0, d=0.0005)
    pol.observe_catch_up(500, 0.5)  # 1 ms a token: a 500-token prompt costs 50 target steps
    for _ in range(40):
        pol.observe_verify("r", 4, 4)
    assert pol.catch_up_cost() == pytest.approx(0.001)
    assert pol.choose(["r"], [4], [False], backlog=[500], left=[1000]) == [4]
    assert pol.choose(["r"], [4], [False], backlog=[500], left=[5]) == [0]
    assert pol.choose(["r"], [4], [False], backlog=[5], left=[5]) == [4]  # a steady catch-up: in d already


def test_catch_up_cost_before_one_is_measured_is_the_proposers_per_token_cost():
    """Until a catch-up is measured, a token caught up on costs as much as a proposed one (an upper bound)."""
    pol = fitted(0.010, 0.0, d=0.002)
    assert pol.catch_up_cost() == pytest.approx(0.002)
    pol.observe_catch_up(200, 0.02)
    assert pol.catch_up_cost() == pytest.approx(0.0001)


def decoding(rid: str, prompt_len: int):
    """A running greedy request that is decoding."""
    return decoding_request(rid, prompt_len, SamplingParams(), max_new=32)


def test_speculator_measures_the_catch_up_apart(monkeypatch):
    """A call that caught up on a prompt feeds the catch-up cost (its proposals' fitted share aside), not the
    per-token proposer cost."""
    import meshlm.engine.spec_engine as spec_engine

    clock = FakeClock()
    monkeypatch.setattr(spec_engine.time, "perf_counter", clock)
    sp = Speculator(CatchUpProposer(clock, per_token=0.0, per_fed=0.002), SpeculativeConfig("draft:x", 4))
    req = decoding("r", prompt_len=99)
    sp.policy.observe_step(1, 0.01)
    sp.policy.observe_step(5, 0.01)
    sp.policy.observe_propose(4, 0.0)
    sp.propose(SimpleNamespace(running=[req], waiting=[]), 1)
    assert req.draft == (1, 1, 1, 1)
    assert sp.catch_up_seconds == pytest.approx(0.2) and sp.policy.catch_up_cost() == pytest.approx(0.002)
    assert sp.policy.proposer_cost() == (0.0, 0.0)


def test_pipelined_step_samples_take_the_mean_size_in_flight_and_skip_prefills(monkeypatch):
    """pp > 1: the interval between step ends is sampled at the mean token count of the finished step and the
    ones still in flight; an interval with a prompt chunk in flight (tokens None) is no sample."""
    import meshlm.engine.spec_engine as spec_engine

    clock = FakeClock()
    monkeypatch.setattr(spec_engine.time, "perf_counter", clock)
    sp = Speculator(CatchUpProposer(clock, 0.0, 0.0), SpeculativeConfig("ngram", 4))
    sp.step_done(None, busy=True)  # a prefill: starts the clock, no sample
    clock.now += 0.5
    sp.step_done(None, busy=True)  # a decode step with a prompt chunk in flight behind it: no sample
    assert not sp.policy.step.measured
    clock.now += 0.030
    sp.step_done([8, 40], busy=True)
    assert sp.policy.step.mean() == pytest.approx(24) and sp.policy.cost() == pytest.approx((0.030, 0.0))
