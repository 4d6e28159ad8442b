"""The whole server's engine figures: the replicas' latest snapshots added up (/metrics, unlabelled series).

Counts and counters add; queue caps count routable replicas only; KV use is the mean and the pipeline bubble
the worst. A figure that does not add (an expert-parallel layer's balance) takes the worst replica here, and
each replica's own value is exported apart with a `replica` label (serve/metrics.py, ReplicaCollector).
"""

from __future__ import annotations

from collections import Counter

from meshlm.engine.engine_config import EngineStats, ExpertFigures  # serve never imports parallel
from meshlm.engine.spec_policy import SpecCounters
from meshlm.serve.engine_loop import Snapshot


def sum_snapshots(snaps: list[Snapshot], max_waiting: int) -> Snapshot:
    """One Snapshot for the server from the replicas' (max_waiting: the routable replicas' queue caps)."""
    stats = [s.stats for s in snaps]
    comm: dict[str, float] = {}
    for s in stats:
        for k, v in s.collective_seconds.items():
            comm[k] = comm.get(k, 0.0) + v
    total = EngineStats(sum(s.running for s in stats), sum(s.waiting for s in stats), max_waiting,
                        sum(s.kv_usage for s in stats) / len(stats), sum(s.num_preemptions for s in stats),
                        sum(s.prompt_tokens for s in stats), sum(s.generation_tokens for s in stats), comm,
                        max(s.bubble_fraction for s in stats),
                        sum_spec([s.speculative for s in stats if s.speculative is not None]),
                        expert_tokens_dropped=sum(s.expert_tokens_dropped for s in stats),
                        cp_ring_choices=dict(sum((Counter(s.cp_ring_choices) for s in stats), Counter())),
                        experts=sum_experts([s.experts for s in stats if s.experts is not None]))
    return Snapshot(total, sum(s.step_seconds for s in snaps))


def sum_spec(counters: list[SpecCounters]) -> SpecCounters | None:
    """The replicas' speculation counters added up (None when none speculates)."""
    if not counters:
        return None
    width = max(len(c.proposed_at) for c in counters)

    def col(name: str) -> list[int]:
        return [sum(getattr(c, name)[i] for c in counters if i < len(getattr(c, name))) for i in range(width)]

    return SpecCounters(sum(c.drafts for c in counters), sum(c.proposed for c in counters),
                        sum(c.accepted for c in counters), col("proposed_at"), col("accepted_at"))


def sum_experts(figures: list[ExpertFigures]) -> ExpertFigures | None:
    """The replicas' expert figures: rows per expert, link bytes, rebalances and buffer counters added; per layer,
    the worst replica's balance (max / mean rank load). None when no replica has experts to report."""
    if not figures:
        return None
    balance: dict[int, float] = {}
    load: dict[int, list[int]] = {}
    links: Counter = Counter()
    for f in figures:
        for layer, b in f.balance.items():
            balance[layer] = max(balance.get(layer, b), b)
        for layer, rows in f.load.items():
            load[layer] = [a + b for a, b in zip(load.get(layer, [0] * len(rows)), rows)]  # one model: E each
        links.update(f.link_bytes)
    return ExpertFigures(balance, load, dict(links), sum(f.rebalances for f in figures),
                         sum(f.moved for f in figures), sum(f.buffer_hits for f in figures),
                         sum(f.buffer_misses for f in figures), sum(f.buffer_fetch_seconds for f in figures))
