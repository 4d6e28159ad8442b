"""Search: every dp x pp x tp that uses the whole cluster, each rejected with its reason or ranked.

Rejections, checked in order: heads (tp > attention heads; uneven splits are fine), layers (pp > layers),
link (a tensor-parallel group that spans nodes: its per-layer all-reduces would cross the inter-node
link; keep TP inside a node and PP across nodes), memory (memory.check), slo (TTFT or TPOT over the
workload's target). An MoE layout at tp = 1 that fails memory with every expert resident is planned with the
largest expert budget that fits (memory.budget_that_fits), its misses priced in the cost.
The survivors are ranked by the objective (throughput per device, TTFT or TPOT),
ties going to the fewest model-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from meshlm.config import ModelConfig
from meshlm.errors import ConfigError
from meshlm.parallel.mesh import ParallelDims
from meshlm.plan.cluster import Cluster
from meshlm.plan.cost import Estimate, all_reduce, estimate
from meshlm.plan.layout import BYTES, Layout, Workload, rank_shares
from meshlm.plan.memory import GB, MemoryReport, budget_that_fits, check
from meshlm.plan.weights import WeightFormat


@dataclass(frozen=True)
class Candidate:
    """A layout with its memory report and, when it fits, its estimate."""

    layout: Layout
    memory: MemoryReport | None = None
    estimate: Estimate | None = None
    rejected: str = ""  # kind: heads | layers | link | memory | slo ("" when accepted)
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    """The search's answer: the chosen layout, why, and every other layout's fate."""

    model: str
    cluster: str
    dtype: str
    workload: Workload
    chosen: Candidate | None
    weights: WeightFormat = WeightFormat()  # how the weights are stored (None fields: in dtype)
    ranked: list[Candidate] = field(default_factory=list)  # accepted, best first
    rejected: list[Candidate] = field(default_factory=list)
    binding: str = ""  # what decided the choice
    fix: str = ""  # when nothing fits: what to change


def layouts(cluster: Cluster, moe: bool = False, cp: int = 1, redundant: int = 0,
            expert_budget: int = 0) -> list[Layout]:
    """Every (dp, pp, tp) whose product with cp is the cluster's device count; for an MoE model each tp > 1
    also with ep = tp (whole experts per rank, `redundant` extra copies), and tp = 1 with `expert_budget` bytes
    of resident experts when given."""
    if cp < 1 or cluster.devices % cp:
        raise ConfigError(f"--cp {cp} does not divide the cluster's {cluster.devices} devices; choose a divisor.")
    n = cluster.devices // cp
    base = [Layout(n // (tp * pp), pp, tp, cp=cp) for tp in range(1, n + 1) for pp in range(1, n // tp + 1)
            if n % (tp * pp) == 0]
    if not moe:
        return base
    base = [replace(x, expert_budget=expert_budget) if x.tp == 1 else x for x in base]
    return base + [Layout(x.dp, x.pp, x.tp, ep=x.tp, cp=cp, redundant=redundant) for x in base if x.tp > 1]


def spans_nodes(layout: Layout, cluster: Cluster) -> bool:
    """True when some tensor-parallel group has ranks on two nodes."""
    per = cluster.node.devices
    return cluster.nodes > 1 and any(g // per != (g + layout.tp - 1) // per
                                     for g in range(0, layout.world, layout.tp))


def _link_reason(cfg: ModelConfig, layout: Layout, cluster: Cluster, work: Workload, dtype: str) -> str:
    assert cluster.inter is not None
    row = work.batch * cfg.hidden_size * BYTES[dtype]
    ar = 2 * cfg.num_layers + 1
    across = ar * all_reduce(cluster.inter, layout.tp, row)
    inside = ar * all_reduce(cluster.node.link(), layout.tp, row)
    return (f"link: the tp={layout.tp} group spans nodes, so its {ar} all-reduces per decode step cross "
            f"{cluster.inter.transport} ({cluster.inter.bandwidth / 1e9:.0f} GB/s, "
            f"{cluster.inter.latency * 1e6:.0f} us): {across * 1e3:.2f} ms against {inside * 1e3:.2f} ms "
            f"over {cluster.node.link().transport}. Keep tp <= {cluster.node.devices} (inside a node) and "
            "put pp across nodes.")


def evaluate(cfg: ModelConfig, layout: Layout, cluster: Cluster, work: Workload, dtype: str,
             weights: WeightFormat | None = None) -> Candidate:
    """One layout's fate: rejected with a reason, or its memory report and estimate."""
    try:
        ParallelDims(dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep).check_model(cfg)
    except ConfigError as e:
        kind = "heads" if layout.tp > cfg.num_heads else "experts" if layout.ep > cfg.num_experts else "layers"
        return Candidate(layout, rejected=kind, reason=f"{kind}: {e}")
    if spans_nodes(layout, cluster):
        return Candidate(layout, rejected="link", reason=_link_reason(cfg, layout, cluster, work, dtype))
    mem = check(cfg, layout, cluster, work, dtype, weights=weights)
    if not mem.ok and not layout.expert_budget and (budget := budget_that_fits(cfg, layout, cluster, work, dtype,
                                                                                weights)):
        layout = replace(layout, expert_budget=budget)  # fits only with cold experts in host memory
        mem = check(cfg, layout, cluster, work, dtype, weights=weights)
    if not mem.ok:
        return Candidate(layout, mem, rejected="memory", reason=mem.reason)
    est = estimate(cfg, layout, cluster, work, dtype, weights)
    for name, limit, value in (("TTFT", work.slo_ttft_s, est.prefill.total),
                               ("TPOT", work.slo_tpot_s, est.decode.total)):
        if limit is not None and value > limit:
            return Candidate(layout, mem, est, "slo", f"slo: {name} {value * 1e3:.1f} ms is over the "
                                                      f"{limit * 1e3:.1f} ms target.")
    return Candidate(layout, mem, est)


def search(cfg: ModelConfig, cluster: Cluster, work: Workload, dtype: str, name: str = "",
           weights: WeightFormat | None = None, cp: int = 1, redundant: int = 0, expert_budget: int = 0) -> Plan:
    """Evaluate every layout of the cluster (at context-parallel degree cp) and choose by the workload's
    objective (weights: their storage; redundant, expert_budget: --redundant-experts, --expert-budget)."""
    weights = weights or WeightFormat()
    cands = [evaluate(cfg, lay, cluster, work, dtype, weights)
             for lay in layouts(cluster, cfg.is_moe, cp, redundant, expert_budget)]
    ok = sorted((c for c in cands if not c.rejected),
                key=lambda c: (round(c.estimate.metric(work.objective), 12), c.layout.model_ranks, c.layout))
    bad = sorted((c for c in cands if c.rejected), key=lambda c: c.layout.model_ranks)
    plan = Plan(name or cfg.name or cfg.architecture, cluster.name, dtype, work, ok[0] if ok else None,
                weights, ok, bad)
    if not ok:
        return _no_fit(plan, cfg, cluster, work, dtype)
    return Plan(**{**plan.__dict__, "binding": binding(plan)})


def binding(plan: Plan) -> str:
    """The constraint that decided the choice: what stopped a smaller layout, else the dominant term."""
    chosen = plan.chosen
    assert chosen is not None and chosen.estimate is not None
    smaller = [c for c in plan.rejected if c.layout.model_ranks < chosen.layout.model_ranks
               and c.rejected in ("memory", "heads", "slo")]
    if smaller:
        c = max(smaller, key=lambda c: (c.layout.model_ranks, c.layout.tp))
        return f"{c.rejected} (the next smaller layout, {c.layout}, fails: {c.reason})"
    phase = chosen.estimate.prefill if plan.workload.objective == "ttft" else chosen.estimate.decode
    terms = {"compute": phase.compute, "collectives": phase.collectives, "control": phase.control,
             "p2p": phase.p2p, "bubble": phase.bubble, "fetch": phase.fetch}
    top = max(terms, key=lambda k: terms[k])
    name = "TTFT" if phase is chosen.estimate.prefill else "TPOT"
    streams = phase.bound == "bandwidth"
    what = {"compute": ("memory bandwidth: every step streams the stage's weights" if streams
                        else "matmul rate: the slowest stage's FLOPs"),
            "collectives": "link: tensor-parallel all-reduces", "control": "link: per-step control messages",
            "p2p": "link: pipeline transfers", "bubble": "pipeline bubbles: stages wait for each other",
            "fetch": "host reads: expert buffer misses"}[top]
    return f"{what} ({terms[top] / phase.total:.0%} of {name})"


def _no_fit(plan: Plan, cfg: ModelConfig, cluster: Cluster, work: Workload, dtype: str) -> Plan:
    """Nothing fits: say how many devices of this kind the weights alone need, and other levers."""
    weights = rank_shares(cfg, Layout(), dtype, plan.weights)[0].weight_bytes
    dev = cluster.node.device
    per = dev.memory * dev.memory_utilization - dev.reserved
    need = -(-int(weights) // int(max(per, 1)))
    kinds = sorted({c.rejected for c in plan.rejected})
    fix = (f"no layout of {cluster.name} ({cluster.devices} x {dev.name}) fits: rejected for "
           f"{', '.join(kinds)}. The {plan.weights.describe(dtype)} weights alone are {weights / GB:.1f} GB: "
           f"at least {need} devices of {per / GB:.0f} GB usable each, before KV cache. Fix: add devices "
           f"(nodes of {cluster.node.devices}: {-(-need // cluster.node.devices)}), use a smaller dtype or "
           "--quantize, or lower the batch or context.")
    return Plan(**{**plan.__dict__, "fix": fix})
