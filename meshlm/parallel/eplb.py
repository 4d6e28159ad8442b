"""Expert load balancing (pure): redundant replicas of the hottest experts, placed to minimise the most loaded
rank, moving as few experts as that allows.

Load model: `load[e]` rows routed to expert e over the window; a token goes to copy (token index mod copies),
so each of an expert's c copies takes load[e] / c, and a rank's load is the sum over the experts it holds.
A rank's memory budget is its slot count (`caps[r]` whole experts, the same bytes each).

rebalance(current, load, caps, redundant):
    1. replica counts: every expert 1, then `redundant` extra copies (at most sum(caps) - E, at most one per rank
       each), each to the expert whose per-copy load is the highest at that moment;
    2. candidates: (a) sticky: copies, hottest first, stay on a rank that holds them now while that rank stays
       under the fresh bound (b); the rest go to the least loaded rank with a free slot; (b) fresh: longest
       processing time first (each copy to the least loaded rank with a free slot not holding it); (c) slots
       first (each copy to the ranks with the most free slots: always feasible);
    3. the feasible candidate with the smallest (max rank load, experts moved) wins; the current placement is
       kept (nothing moves) unless the winner lowers the max rank load (or the current one exceeds the budgets).
       So an unchanged load moves nothing, and the max rank load is never worse than before.
Experts a rank keeps stay in their slot order; the ones it gains follow, ascending.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from meshlm.errors import ConfigError
from meshlm.parallel.expert import ExpertLoad, ExpertParallelExperts, Placement

EPS = 1e-9


def rank_loads(placement: Placement, load: Sequence[float]) -> list[float]:
    """Each rank's share of `load` (rows per expert) under `placement`, copies splitting their expert evenly."""
    copies = Counter(e for rank in placement.slots for e in rank)
    return [sum(load[e] / copies[e] for e in rank) for rank in placement.slots]


def balance(placement: Placement, load: Sequence[float]) -> float:
    """max / mean rank load (1.0: perfectly even, or no load)."""
    loads = rank_loads(placement, load)
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def moved(old: Placement, new: Placement) -> int:
    """Expert copies a rank holds in `new` but not in `old` (each one a weight load)."""
    return sum(len(set(b) - set(a)) for a, b in zip(old.slots, new.slots))


def replica_counts(load: Sequence[float], ranks: int, extra: int) -> list[int]:
    """Copies per expert: 1 each, then up to `extra` more to the highest per-copy load (at most `ranks` each)."""
    copies = [1] * len(load)
    for _ in range(extra):
        best = max((e for e in range(len(load)) if copies[e] < ranks), key=lambda e: load[e] / copies[e],
                   default=None)
        if best is None or load[best] <= 0:
            break
        copies[best] += 1
    return copies


def rebalance(current: Placement, load: Sequence[float], caps: int | Sequence[int], redundant: int) -> Placement:
    """The placement for `load` within `caps` slots per rank with up to `redundant` extra copies (module doc)."""
    e_count, ranks = current.num_experts, current.ranks
    caps = [caps] * ranks if isinstance(caps, int) else list(caps)
    if len(load) != e_count or len(caps) != ranks:
        raise ConfigError(f"rebalance: {len(load)} loads and {len(caps)} rank budgets for {e_count} experts on "
                          f"{ranks} ranks; give one load per expert and one budget per rank.")
    if sum(caps) < e_count:
        raise ConfigError(f"rebalance: {sum(caps)} expert slots over {ranks} ranks cannot hold {e_count} experts; "
                          f"raise the slots per rank to at least {-(-e_count // ranks)}.")
    copies = replica_counts(load, ranks, max(0, min(redundant, sum(caps) - e_count)))
    items = sorted(((load[e] / copies[e], e) for e in range(e_count) for _ in range(copies[e])),
                   key=lambda t: (-t[0], t[1]))
    fresh = _lpt(items, caps, [set() for _ in range(ranks)], [0.0] * ranks)
    bound = max(_loads(fresh, items, copies, load)) if fresh else float("inf")
    candidates = [c for c in (_sticky(items, caps, current, bound), fresh, _slots_first(items, caps)) if c]
    best = min((_placement(current, c) for c in candidates),
               key=lambda p: (round(max(rank_loads(p, load)), 9), moved(current, p)))
    fits = all(len(s) <= c for s, c in zip(current.slots, caps)) and \
        sum(map(len, current.slots)) <= e_count + redundant
    if fits and max(rank_loads(current, load)) <= max(rank_loads(best, load)) + EPS:
        return current
    return best


def _loads(held: list[set[int]], items, copies, load) -> list[float]:
    return [sum(load[e] / copies[e] for e in rank) for rank in held]


def _lpt(items, caps, held: list[set[int]], loads: list[float]) -> list[set[int]] | None:
    """Place the (per-copy load, expert) items, each on the least loaded rank with room that lacks it."""
    held, loads = [set(h) for h in held], list(loads)
    for c, e in items:
        ok = [r for r in range(len(caps)) if len(held[r]) < caps[r] and e not in held[r]]
        if not ok:
            return None
        r = min(ok, key=lambda r: (loads[r], -(caps[r] - len(held[r])), r))
        held[r].add(e)
        loads[r] += c
    return held


def _sticky(items, caps, current: Placement, bound: float) -> list[set[int]] | None:
    """Copies stay where they are while their rank stays within `bound`; the rest placed as _lpt."""
    held = [set() for _ in caps]
    loads = [0.0] * len(caps)
    rest = []
    for c, e in items:
        home = [r for r, rank in enumerate(current.slots) if e in rank and e not in held[r]
                and len(held[r]) < caps[r] and loads[r] + c <= bound + EPS]
        if home:
            r = min(home, key=lambda r: (loads[r], r))
            held[r].add(e)
            loads[r] += c
        else:
            rest.append((c, e))
    return _lpt(rest, caps, held, loads) if rest else held


def _slots_first(items, caps) -> list[set[int]] | None:
    """Each expert's copies (most copies first) on the ranks with the most free slots: feasible whenever
    sum(caps) >= copies and no expert has more copies than ranks."""
    count = Counter(e for _, e in items)
    held = [set() for _ in caps]
    for e in sorted(count, key=lambda e: (-count[e], e)):
        ranks = sorted(range(len(caps)), key=lambda r: (-(caps[r] - len(held[r])), r))[: count[e]]
        if any(len(held[r]) >= caps[r] for r in ranks):
            return None
        for r in ranks:
            held[r].add(e)
    return held


def _placement(current: Placement, held: list[set[int]]) -> Placement:
    """Rank sets -> Placement: kept experts in their current slot order, gained ones after, ascending."""
    slots = []
    for old, new in zip(current.slots, held):
        slots.append(tuple(e for e in old if e in new) + tuple(sorted(new - set(old))))
    return Placement(current.num_experts, tuple(slots))


@dataclass(frozen=True)
class BalancerSpec:
    """--eplb-interval / --redundant-experts / --eplb-window / --expert-slots (ep > 1)."""

    interval: int = 0  # rebalance every this many engine steps (0: only when asked, LLM.rebalance_experts)
    redundant: int = 0  # extra expert copies over the group, beyond one of each
    window: int = 64  # steps of routing counts the balancer looks back over
    slots: int | None = None  # experts a rank may hold (its memory budget); None: ceil(E / ep) + ceil(redundant / ep)

    def __post_init__(self) -> None:
        if min(self.interval, self.redundant) < 0 or self.window < 1 or (self.slots is not None and self.slots < 1):
            raise ConfigError(f"expert balancing: interval {self.interval}, redundant {self.redundant}, window "
                              f"{self.window}, slots {self.slots}; give counts >= 0, a window >= 1 and slots >= 1.")


@dataclass(frozen=True)
class ExpertFigures:
    """Rank 0's view of its stage's MoE layers, over the balancer's window (exported to Prometheus)."""

    balance: dict[int, float]  # layer -> max / mean rank load under the current placement
    load: dict[int, list[int]]  # layer -> rows routed to each expert
    link_bytes: dict[tuple[int, int], int]  # (src, dst) group index -> all-to-all bytes since start, whole group
    rebalances: int = 0
    moved: int = 0  # expert copies loaded by rebalances since start (this rank's group, summed over ranks)
    buffer_hits: int = 0  # --expert-budget: expert uses that found it resident
    buffer_misses: int = 0  # ... that read it from host memory
    buffer_fetch_seconds: float = 0.0  # seconds spent reading experts in (misses and prefetches)


Fetch = Callable[[str, list[int]], dict[str, torch.Tensor]]  # (module name, expert ids) -> {"w1": [n, I, H], ..}


class Balancer:
    """A rank's expert balancing: every rank of a group holds the same window (the group's counts), so each
    decides the same placement alone; each then loads only the experts it gains (fetch) and switches."""

    def __init__(self, spec: BalancerSpec, model: nn.Module, load: ExpertLoad) -> None:
        self.spec, self.load, self.steps = spec, load, 0
        self.layers = {m.layer_id: (name, m) for name, m in model.named_modules()
                       if isinstance(m, ExpertParallelExperts)}
        self.rebalances, self.moved = 0, 0

    def after_step(self, fetch: Fetch) -> dict | None:
        """Count an engine step; every `interval` steps, rebalance."""
        self.steps += 1
        if self.spec.interval and self.steps % self.spec.interval == 0:
            return self.rebalance(fetch)
        return None

    def rebalance(self, fetch: Fetch) -> dict:
        """Rebalance every MoE layer of this stage from the window; {"moved", "seconds", "balance": {layer:
        [before, after]}} (moved: experts this rank loaded)."""
        t0, window, moved_here, report = time.perf_counter(), self.load.window_routed(), 0, {}
        for layer, (name, m) in sorted(self.layers.items()):
            load = window.get(layer)
            if load is None:
                continue
            load = load.tolist()
            current = m.placement
            slots = self.spec.slots or (-(-current.num_experts // current.ranks) + -(-self.spec.redundant //
                                                                                        current.ranks))
            new = rebalance(current, load, slots, self.spec.redundant)
            report[layer] = [balance(current, load), balance(new, load)]
            self.moved += moved(current, new)
            moved_here += m.move_to(new, lambda ids, name=name: fetch(name, ids))
        self.rebalances += 1
        return {"moved": moved_here, "seconds": time.perf_counter() - t0, "balance": report}

    def figures(self) -> ExpertFigures:
        """Balance and per-expert load over the window, the group's per-link bytes (H x itemsize x 2 per row)."""
        window = self.load.window_routed()
        bal, load = {}, {}
        for layer, (_, m) in self.layers.items():
            if layer in window:
                load[layer] = window[layer].tolist()
                bal[layer] = balance(m.placement, load[layer])
        links = {}
        if self.layers:
            m = next(iter(self.layers.values()))[1]
            row = m.w2.shape[1] * m.w2.element_size() * 2  # dispatch + combine
            links = {(s, d): int(n) * row for (s, d), n in np.ndenumerate(self.load.link_rows.numpy()) if s != d} \
                if self.load.link_rows is not None else {}
        return ExpertFigures(bal, load, links, self.rebalances, self.moved)
