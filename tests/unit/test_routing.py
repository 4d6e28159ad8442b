"""The router's rules (serve/routing.py, serve/router.py) as properties: no processes, no model."""

from __future__ import annotations

import asyncio
import random
import time

from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshlm.config import SamplingParams
from meshlm.serve.fleet import ReplicaLost, RouterConfig
from meshlm.serve.replica import ReplicaSpec
from meshlm.serve.router import Routed, Router
from meshlm.serve.routing import (
    Beat,
    CircuitBreaker,
    ReplicaView,
    RetryPolicy,
    affinity_key,
    pick,
    retry_delay,
    stalled,
)

views = st.lists(st.tuples(st.booleans(), st.integers(0, 10_000)), min_size=1, max_size=8).map(
    lambda xs: [ReplicaView(i, ok, load) for i, (ok, load) in enumerate(xs)])
keys = st.binary(min_size=1, max_size=32)


@given(views, keys, st.integers(0, 5000))
def test_pick_only_routable_and_within_slack(reps, key, slack):
    """pick() never returns a replica that is not routable, None only when none is, and never one carrying
    more than the least loaded routable replica plus the slack."""
    got = pick(reps, key, slack)
    ok = [r for r in reps if r.routable]
    if not ok:
        assert got is None
        return
    assert got is not None and reps[got].routable
    assert reps[got].outstanding <= min(r.outstanding for r in ok) + slack


@settings(max_examples=50)
@given(st.integers(2, 6), st.lists(st.tuples(keys, st.integers(1, 600)), min_size=1, max_size=200),
       st.integers(0, 2048))
def test_load_spread_is_bounded(n, requests, slack):
    """Placing requests one by one (none finishing) keeps max - min load within slack + the largest request."""
    load = [0] * n
    for key, cost in requests:
        i = pick([ReplicaView(j, True, load[j]) for j in range(n)], key, slack)
        load[i] += cost
    assert max(load) - min(load) <= slack + max(c for _, c in requests)


@given(st.integers(2, 8), st.lists(st.integers(0, 500), min_size=1, max_size=64), st.data())
def test_affinity_is_stable(n, prompt, data):
    """At equal load a prompt always goes to the same replica, and stays there when another one leaves."""
    key = affinity_key(prompt, 16)
    reps = [ReplicaView(i, True, 0) for i in range(n)]
    home = pick(reps, key, 0)
    assert home == pick(reps, key, 0)
    other = data.draw(st.sampled_from([i for i in range(n) if i != home]))
    reps[other] = ReplicaView(other, False, 0)
    assert pick(reps, key, 0) == home
    if len(prompt) >= 16:  # prompts sharing their first block share a replica
        assert affinity_key(prompt + [1, 2, 3], 16) == key


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=10))
def test_breaker_opens_and_backs_off(gaps):
    """A failure opens the circuit for a cooldown that doubles with each failure in the window (capped)."""
    b = CircuitBreaker(base_s=1.0, max_s=60.0, window_s=300.0)
    assert not b.closed  # a new replica is probed first
    now, cooldowns = 0.0, []
    for gap in sorted(gaps):
        now = max(now, gap)
        cooldowns.append(b.fail(now))
        assert not b.closed and not b.may_try(now)
        assert b.may_try(now + cooldowns[-1])
        b.trying()
        assert not b.closed
    b.succeed()
    assert b.closed
    assert all(1.0 <= c <= 60.0 for c in cooldowns)
    assert cooldowns[-1] == min(60.0, 2.0 ** (len(b.failures) - 1))  # failures: those inside the window


@given(st.integers(1, 10), st.floats(0, 100), st.one_of(st.none(), st.floats(0, 100)), st.integers(0, 2**32))
@example(2, 0.0, 0.0625, 0)  # the draw (0.07 s) ends past the deadline; d/2 (0.05 s) still fits
def test_retry_delay_bounded_and_before_deadline(attempt, now, until, seed):
    """No attempt past max_attempts; a pause is jittered within [d/2, d] and ends before the deadline; a move
    is given up only when even d/2 would end at the deadline."""
    policy = RetryPolicy(max_attempts=3, base_s=0.05, max_s=1.0)
    deadline = None if until is None else now + until
    d = retry_delay(policy, attempt, now, deadline, random.Random(seed))
    if attempt > 3:
        assert d is None
        return
    full = min(1.0, 0.05 * 2 ** (attempt - 1))
    if d is not None:
        assert full / 2 <= d <= full
        assert deadline is None or now + d < deadline
    else:
        assert deadline is not None and now + full / 2 >= deadline


def test_stalled():
    """Silent too long, or one engine call running too long: failed; beating and progressing: fine."""
    assert stalled(Beat(5, 0.0), 0.1, 1.5) is None
    assert stalled(Beat(5, 1.0), 0.1, 1.5) is None
    assert "no heartbeat" in stalled(Beat(5, 0.0), 1.6, 1.5)
    assert "no progress" in stalled(Beat(5, 1.45), 0.1, 1.5)
    assert stalled(None, 0.2, 1.5) is None


def _router(dp: int, **kw) -> Router:
    return Router(ReplicaSpec(), RouterConfig(dp=dp, **kw))


@given(st.lists(st.tuples(st.sampled_from(["starting", "healthy", "failed"]),
                          st.sampled_from(["closed", "open", "half_open"])), min_size=1, max_size=6),
       st.lists(st.integers(0, 500), min_size=1, max_size=40))
def test_router_never_routes_to_an_open_circuit(states, prompt):
    """Whatever the replicas' states, the router picks only a healthy replica whose circuit is closed."""
    router = _router(len(states))
    for r, (state, circuit) in zip(router.replicas, states):
        r.state, r.breaker.state = state, circuit
    got = router._pick(tuple(prompt), set())
    if got is None:
        assert not any(s == "healthy" and c == "closed" for s, c in states)
        assert router.unavailable() is not None
    else:
        assert got.state == "healthy" and got.breaker.state == "closed"


def _moved(router: Router, deadline_s: float | None) -> tuple[Routed, asyncio.Queue]:
    out: asyncio.Queue = asyncio.Queue()
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    rec = Routed("r0", 0, (5, 6, 7), SamplingParams(max_tokens=8), out, deadline, token_ids=[9, 10], text="w9.")
    return rec, out


def test_migration_retries_are_bounded():
    """A request whose every new replica fails is given up after max_attempts moves, with an error."""
    async def run() -> tuple[int, str | None]:
        router = _router(2, retry=RetryPolicy(max_attempts=3, base_s=0.001, max_s=0.002))
        for r in router.replicas:
            r.state, r.breaker.state = "healthy", "closed"
        sends = []

        async def lost(r, recs, probing=False):
            sends.append(r.index)
            raise ReplicaLost("gone again")

        router._send = lost
        rec, out = _moved(router, None)
        await router._migrate(rec)
        return len(sends), out.get_nowait().finish_reason

    sends, reason = asyncio.run(run())
    assert sends == 3 and reason == "error"


def test_migration_respects_the_deadline():
    """With no routable replica, a moved request ends as a timeout at its original deadline, not later."""
    async def run() -> tuple[float, str | None]:
        router = _router(1, retry=RetryPolicy(base_s=0.001, max_s=0.002))
        rec, out = _moved(router, 0.3)
        t0 = time.monotonic()
        await router._migrate(rec)
        return time.monotonic() - t0, out.get_nowait().finish_reason

    took, reason = asyncio.run(run())
    assert reason in ("timeout", "error") and took < 0.3 + 0.1


def test_moved_request_resumes_where_it_was():
    """The work sent to the new replica carries the tokens and text the client already has."""
    async def run():
        router = _router(2, retry=RetryPolicy(base_s=0.001, max_s=0.002))
        router.loop = asyncio.get_running_loop()
        sent = []

        class Proc:
            def send(self, msg):
                sent.append(msg)
                router.replicas[1].acks[msg.key].set_result(None)

        router.replicas[1].state, router.replicas[1].breaker.state = "healthy", "closed"
        router.replicas[1].proc = Proc()
        rec, _ = _moved(router, 5.0)
        await router._migrate(rec)
        return sent[0], rec

    work, rec = asyncio.run(run())
    assert work.resume[0].token_ids == (9, 10) and work.resume[0].text == "w9."
    assert work.prompts == ((5, 6, 7),) and 0 < work.timeout_s <= 5.0
    assert rec.replica == 1 and rec.accepted


def test_router_snapshot_sums_cp_ring_choices():
    """/metrics reads the router's summed snapshot: the replicas' context-parallel ring choices add up there."""
    from meshlm.engine.engine import EngineStats
    from meshlm.serve.engine_loop import Snapshot

    router = _router(2)
    for r, choices in zip(router.replicas, ({"pass-kv": 3, "pass-q": 1}, {"pass-q": 2})):
        r.snapshot = Snapshot(EngineStats(cp_ring_choices=choices))
    assert router.snapshot.stats.cp_ring_choices == {"pass-kv": 3, "pass-q": 3}


def test_router_snapshot_carries_expert_figures():
    """/metrics reads the router's summed snapshot: every replica's dropped rows, expert loads, link bytes and
    buffer counters add up there, the balance is the worst replica's, each replica's own balance and link bytes
    are exported with a `replica` label, and one replica's figures pass through unchanged."""
    from meshlm.engine.engine import EngineStats
    from meshlm.engine.engine_config import ExpertFigures
    from meshlm.serve.engine_loop import Snapshot
    from meshlm.serve.metrics import ReplicaCollector, ServerMetrics, parse_samples

    figs = [ExpertFigures({1: 1.5, 3: 1.0}, {1: [4, 0, 2, 2], 3: [2, 2, 2, 2]}, {(0, 1): 640, (1, 0): 320},
                          rebalances=2, moved=3, buffer_hits=7, buffer_misses=1, buffer_fetch_seconds=0.25),
            ExpertFigures({1: 1.2, 3: 1.4}, {1: [1, 1, 1, 5], 3: [0, 0, 4, 4]}, {(0, 1): 64},
                          rebalances=1, moved=0, buffer_hits=3, buffer_misses=4, buffer_fetch_seconds=0.5)]
    router = _router(2)
    for r, f, dropped in zip(router.replicas, figs, (5, 6)):
        r.snapshot = Snapshot(EngineStats(expert_tokens_dropped=dropped, experts=f))
    s = router.snapshot.stats
    assert s.expert_tokens_dropped == 11
    assert s.experts == ExpertFigures({1: 1.5, 3: 1.4}, {1: [5, 1, 3, 7], 3: [2, 2, 6, 6]},
                                      {(0, 1): 704, (1, 0): 320}, 3, 3, 10, 5, 0.75)
    metrics = ServerMetrics(lambda: router.snapshot)
    metrics.registry.register(ReplicaCollector(router))
    m = parse_samples(metrics.render().decode())  # prometheus_client's text parser; labels sorted
    assert m["meshlm_expert_tokens_dropped_total"] == 11
    assert m['meshlm_expert_balance_ratio{layer="3"}'] == 1.4
    assert m['meshlm_expert_load_rows{expert="3",layer="1"}'] == 7
    assert m['meshlm_expert_link_bytes_total{dst="1",src="0"}'] == 704
    assert m["meshlm_expert_buffer_hit_ratio"] == 10 / 15 and m["meshlm_expert_buffer_fetch_seconds_total"] == 0.75
    for i, f in enumerate(figs):
        assert m[f'meshlm_replica_expert_balance_ratio{{layer="1",replica="{i}"}}'] == f.balance[1]
        assert m[f'meshlm_replica_expert_link_bytes_total{{dst="1",replica="{i}",src="0"}}'] == f.link_bytes[(0, 1)]
    assert 'meshlm_replica_expert_link_bytes_total{dst="0",replica="1",src="1"}' not in m

    single = _router(1)
    single.replicas[0].snapshot = Snapshot(EngineStats(expert_tokens_dropped=5, experts=figs[0]))
    assert single.snapshot.stats.experts == figs[0] and single.snapshot.stats.expert_tokens_dropped == 5
    assert "meshlm_replica_expert" not in ServerMetrics(lambda: _router(2).snapshot).render().decode()
