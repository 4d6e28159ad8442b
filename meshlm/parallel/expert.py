"""Expert parallelism: whole experts per rank, tokens moved to them by all-to-all and back.

Layout (ep = tp within a pipeline stage): attention stays tensor-parallel, so after it every rank of the
group holds the same hidden states [N, H] and computes the same routing. Each MoE layer then runs:

    1. rank r takes its share of the tokens (even_partition(N, ep)[r]) and counts the rows its routing sends
       to each (destination rank, local slot);
    2. those counts are all-gathered (ep x ep x slots int64), so every rank knows what each link carries and
       the whole group's rows per expert: ExpertLoad records them there, where routing decided and before
       any row moves, identically on every rank (rank 0's copy is the group's);
    3. dispatch: all-to-all-v of the routed rows, grouped by destination, then slot, then token;
    4. each rank runs its experts on the rows it received (rows of one expert in global token order, so the
       products equal one device's), keeping at most `capacity` rows per expert when a capacity factor is
       set (the rest are dropped: they contribute zero, and are counted);
    5. combine: all-to-all-v back along the transposed counts; the source rank sums each token's
       weighted expert outputs in ascending expert order (as the one-device Experts does);
    6. all-gather of the token shares restores the full [N, H] on every rank.

Bytes on the wire: (dispatch + combine) ~ 2 x N x K x H x (ep - 1) / ep elements over the group, plus the
all-gather's N x H: they follow the tokens actually routed (top-1 moves about half of top-2).

`Placement` is data read every step: which experts each rank holds, in local slot order, possibly with
replicas (an expert listed on several ranks); a token goes to replica (token index mod replica count).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from meshlm.errors import ConfigError
from meshlm.models.mixtral import Experts, expert_ffn
from meshlm.parallel.comm import Comm
from meshlm.parallel.partition import even_partition


@dataclass(frozen=True)
class Placement:
    """slots[r] = the expert ids rank r holds, in local slot order (slot s is row s of its stacked weights)."""

    num_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        held = {e for rank in self.slots for e in rank}
        if held != set(range(self.num_experts)):
            missing = sorted(set(range(self.num_experts)) - held)
            raise ConfigError(f"expert placement leaves experts {missing} on no rank; every expert needs one.")
        for r, rank in enumerate(self.slots):
            if len(set(rank)) != len(rank):
                raise ConfigError(f"expert placement puts two replicas of one expert on rank {r}: {rank}.")

    @classmethod
    def contiguous(cls, num_experts: int, ep: int) -> Placement:
        """Experts split into ep near-equal contiguous runs, one per rank (no replicas)."""
        if ep > num_experts:
            raise ConfigError(f"ep={ep} exceeds the model's {num_experts} experts: every expert-parallel rank "
                              f"needs at least one. Use --ep <= {num_experts}.")
        return cls(num_experts, tuple(tuple(range(a, b)) for a, b in even_partition(num_experts, ep)))

    @property
    def ranks(self) -> int:
        """Expert-parallel ranks."""
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        """The most experts any rank holds."""
        return max(len(s) for s in self.slots)

    def replicas(self, expert: int) -> list[tuple[int, int]]:
        """(rank, local slot) of every copy of `expert`."""
        return [(r, s) for r, rank in enumerate(self.slots) for s, e in enumerate(rank) if e == expert]

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rank [E, R], slot [E, R], copies [E]) lookup tables, R = the most replicas of any expert."""
        reps = [self.replicas(e) for e in range(self.num_experts)]
        width = max(len(r) for r in reps)
        rank = torch.tensor([[r for r, _ in rs] + [0] * (width - len(rs)) for rs in reps], dtype=torch.long)
        slot = torch.tensor([[s for _, s in rs] + [0] * (width - len(rs)) for rs in reps], dtype=torch.long)
        return rank, slot, torch.tensor([len(rs) for rs in reps], dtype=torch.long)


@dataclass
class ExpertLoad:
    """Per-layer totals, the same on every rank of the group (taken from the exchanged row counts, i.e. the
    routing decisions of every rank, before any row moves): rows routed to each expert, rows past the capacity
    (dropped), and the rows this rank sent each rank (its own share of the dispatch)."""

    routed: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E] int64, whole group
    dropped: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # layer -> rows, whole group
    sent: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [ep] int64 rows, this rank's

    def record(self, layer: int, every: torch.Tensor, me: int, expert_of: torch.Tensor, num_experts: int,
               capacity: int | None) -> None:
        """Add one step: every [src, dst, slot] rows; expert_of [dst, slot] the expert there (num_experts: none)."""
        rows = every.sum(0)  # [dst, slot]
        per = torch.zeros(num_experts + 1, dtype=torch.long).index_add_(0, expert_of.flatten(), rows.flatten())
        self.routed[layer] = self.routed[layer] + per[:num_experts] if layer in self.routed else per[:num_experts]
        self.sent[layer] = self.sent[layer] + every[me].sum(-1) if layer in self.sent else every[me].sum(-1)
        if capacity is not None:
            self.dropped[layer] += int((rows - capacity).clamp(min=0).sum())

    def total_dropped(self) -> int:
        """Rows dropped by the capacity factor, over all layers."""
        return sum(self.dropped.values())

    def snapshot(self) -> dict:
        """{"routed": {layer: [rows per expert]}, "sent": {layer: [rows per rank]}, "dropped": {layer: rows}}."""
        return {"routed": {k: v.tolist() for k, v in sorted(self.routed.items())},
                "sent": {k: v.tolist() for k, v in sorted(self.sent.items())},
                "dropped": dict(sorted(self.dropped.items()))}

    def reset(self) -> None:
        """Forget all totals."""
        self.routed.clear()
        self.dropped.clear()
        self.sent.clear()


class ExpertParallelExperts(Experts):
    """This rank's experts (w1/w3 [S, I, H], w2 [S, H, I] in placement slot order) behind all-to-all."""

    comm: Comm
    placement: Placement
    layer_id: int
    capacity_factor: float | None
    load: ExpertLoad

    def set_placement(self, placement: Placement) -> None:
        """Use `placement` from the next step on (its weights for this rank must already be in w1/w2/w3)."""
        self.placement = placement
        self._tables = placement.tables()
        e = placement.num_experts
        self._expert_of = torch.tensor([list(s) + [e] * (placement.slots_per_rank - len(s)) for s in placement.slots],
                                       dtype=torch.long)  # [rank, slot] -> expert (e: an empty slot)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H] and routing [N, K], identical on every rank -> [N, H] on every rank."""
        comm, me, ep = self.comm, self.comm.index, self.comm.size
        n, k = expert_ids.shape
        shares = even_partition(n, ep)
        a, b = shares[me]
        ids, w = expert_ids[a:b], weights[a:b]  # [n_me, K]: the tokens this rank routes
        rank_t, slot_t, copies = (t.to(ids.device) for t in self._tables)
        pick = (torch.arange(a, b, device=ids.device)[:, None] % copies[ids])  # replica per (token, k)
        dest, slot = rank_t[ids, pick], slot_t[ids, pick]  # [n_me, K]
        per = self.placement.slots_per_rank
        key = (dest * per + slot).flatten()  # [n_me * K]
        order = torch.argsort(key, stable=True)  # by destination, slot, then token
        tok = order // k
        counts = torch.bincount(key, minlength=ep * per)
        every = comm.all_gather(counts, dim=0).view(ep, ep, per).cpu()  # [src, dst, slot] rows
        capacity = self._capacity(n * k)
        self.load.record(self.layer_id, every, me, self._expert_of, self.placement.num_experts, capacity)
        matrix = every.sum(-1).tolist()
        recv = comm.all_to_all_v(x[a:b][tok], matrix)  # [R, H] by source, slot, token
        y = self._run(recv, every[:, me, :], capacity)
        back = comm.all_to_all_v(y, [list(r) for r in zip(*matrix)])  # [n_me * K, H] in sent order
        experts, w = ids.flatten()[order], w.flatten()[order]
        out = torch.zeros(b - a, x.shape[1], dtype=x.dtype, device=x.device)
        for e in torch.unique(experts).tolist():  # ascending, as the one-device sum
            m = experts == e
            out.index_add_(0, tok[m], back[m] * w[m, None].to(back.dtype))
        return comm.all_gather(out, dim=0, sizes=[q - p for p, q in shares])

    def _capacity(self, routed: int) -> int | None:
        """Rows one expert copy may take this step: ceil(factor x routed rows / experts), or None (dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * routed / self.placement.num_experts))

    def _run(self, rows: torch.Tensor, counts: torch.Tensor, capacity: int | None) -> torch.Tensor:
        """rows [R, H] grouped by source then slot, counts [src, slot] -> expert outputs [R, H], same order."""
        per = counts.shape[1]
        slot_of = torch.repeat_interleave(torch.arange(per).repeat(counts.shape[0]), counts.flatten())
        order = torch.argsort(slot_of, stable=True).to(rows.device)  # by slot, then source (= token order)
        xs, ys = rows[order], torch.zeros_like(rows)
        start = 0
        for s, c in enumerate(counts.sum(0).tolist()):
            keep = c if capacity is None else min(c, capacity)
            if keep:
                ys[start: start + keep] = expert_ffn(xs[start: start + keep], self.w1[s], self.w3[s], self.w2[s])
            start += c
        out = torch.empty_like(rows)
        out[order] = ys
        return out


def make_expert_parallel(module: Experts, comm: Comm, placement: Placement, layer_id: int,
                         load: ExpertLoad, capacity_factor: float | None = None) -> None:
    """Turn a (meta) Experts module into this rank's ExpertParallelExperts."""
    module.__class__ = ExpertParallelExperts
    module.comm, module.layer_id, module.capacity_factor, module.load = comm, layer_id, capacity_factor, load
    module.set_placement(placement)
