"""Text and JSON for a plan, the terms of the latency equation, and the dry-run check of one layout."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from meshlm.config import ModelConfig
from meshlm.errors import ConfigError
from meshlm.parallel.mesh import ParallelDims
from meshlm.plan.cluster import Cluster
from meshlm.plan.cost import Estimate, Terms, estimate
from meshlm.plan.layout import Layout, Workload, rank_shares
from meshlm.plan.memory import GB, MemoryReport, check
from meshlm.plan.search import Candidate, Plan, spans_nodes
from meshlm.plan.weights import WeightFormat

TERMS = (("compute", "compute"), ("collectives", "tp collectives"), ("control", "control messages"),
         ("p2p", "pipeline transfers"), ("bubble", "pipeline bubble"), ("fetch", "expert fetches"))


def ms(x: float) -> str:
    """Seconds as milliseconds, 3 significant-ish digits."""
    v = x * 1e3
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def equation(name: str, t: Terms) -> str:
    """'TPOT = max stage time x bubble factor + exposed transfers and control', with the numbers."""
    exposed = t.p2p + t.control
    return (f"{name} = slowest stage {ms(t.stage_max)} ms x bubble factor {t.factor:.2f} ({t.pieces:g} "
            f"pieces + {t.factor - t.pieces:.2f} idle) + exposed {ms(exposed)} ms (transfers {ms(t.p2p)}, "
            f"control {ms(t.control)}) = {ms(t.total)} ms")


def terms_table(est: Estimate) -> list[str]:
    """One row per term: TTFT (prefill) and TPOT (decode), in ms, with the roofline side of compute."""
    rows = [f"  {'term':<20}{'TTFT (prefill) ms':>20}{'TPOT (decode) ms':>20}"]
    for key, label in TERMS:
        rows.append(f"  {label:<20}{ms(getattr(est.prefill, key)):>20}{ms(getattr(est.decode, key)):>20}")
    rows.append(f"  {'total':<20}{ms(est.prefill.total):>20}{ms(est.decode.total):>20}")
    rows.append(f"  {'compute bound by':<20}{est.prefill.bound:>20}{est.decode.bound:>20}")
    return rows + ["  " + equation("TTFT", est.prefill), "  " + equation("TPOT", est.decode)]


def memory_line(m: MemoryReport) -> str:
    """Weights, activations, runtime and KV of the neediest rank against its usable memory."""
    return (f"memory, rank {m.rank}: weights {m.weights / GB:.2f} GB + activations "
            f"{m.activations / GB:.2f} GB + runtime {m.reserved / GB:.2f} GB + KV {m.kv_needed:,} tokens x "
            f"{m.kv_per_token / 1e3:.1f} kB = "
            f"{m.kv_needed * m.kv_per_token / GB:.2f} GB, of {m.usable / GB:.1f} GB usable; KV holds "
            f"{m.kv_tokens:,} tokens ({m.max_batch} full-length sequences); margin {m.margin:.0%}")


def placement(layout: Layout, cluster: Cluster) -> str:
    """Which links the layout's groups cross."""
    across = spans_nodes(layout, cluster) and cluster.inter is not None
    tp = cluster.inter.transport if across and cluster.inter else cluster.node.link().transport
    parts = [f"tp over {tp}" if layout.tp > 1 else "no tp"]
    if layout.pp > 1:
        crosses = cluster.nodes > 1 and layout.model_ranks > cluster.node.devices
        parts.append(f"pp hops over {cluster.inter.transport if crosses and cluster.inter else tp}")
    return ", ".join(parts)


def format_plan(plan: Plan, cfg: ModelConfig, cluster: Cluster) -> str:
    """The human table: chosen layout, binding constraint, each term, ranked and rejected layouts."""
    w, dev = plan.workload, cluster.node.device
    out = [f"model {plan.model}: {cfg.num_params() / 1e9:.2f} B parameters, {plan.dtype} compute, weights "
           f"{plan.weights.describe(plan.dtype)}; cluster "
           f"{cluster.name}: {cluster.nodes} node(s) x {cluster.node.devices} {dev.name}",
           f"workload: batch {w.batch}, prompt {w.prompt_tokens} + output {w.output_tokens} tokens, "
           f"objective {w.objective}" + (f", TTFT <= {w.slo_ttft_s * 1e3:.0f} ms" if w.slo_ttft_s else "")
           + (f", TPOT <= {w.slo_tpot_s * 1e3:.0f} ms" if w.slo_tpot_s else "")]
    c = plan.chosen
    if c is None:
        out.append(f"no layout fits. {plan.fix}")
    else:
        assert c.estimate is not None and c.memory is not None
        e = c.estimate
        out += [f"chosen: {c.layout} ({placement(c.layout, cluster)})", f"binding constraint: {plan.binding}",
                memory_line(c.memory), *terms_table(e),
                f"throughput: {e.throughput:.1f} tokens/s at batch {w.batch} per replica "
                f"({e.per_device:.2f} per device)"]
    if plan.ranked:
        out.append(f"\n  {'accepted layout':<22}{'TTFT ms':>10}{'TPOT ms':>10}{'tok/s/dev':>11}{'margin':>8}")
        for r in plan.ranked:
            assert r.estimate is not None and r.memory is not None
            e = r.estimate
            out.append(f"  {str(r.layout):<22}{ms(e.prefill.total):>10}{ms(e.decode.total):>10}"
                       f"{e.per_device:>11.2f}{r.memory.margin:>8.0%}")
    if plan.rejected:
        out.append(f"\n  {'rejected layout':<22}why")
        out += [f"  {str(r.layout):<22}{r.reason}" for r in plan.rejected]
    return "\n".join(out)


def candidate_json(c: Candidate) -> dict[str, Any]:
    """A candidate as plain data (bytes and seconds)."""
    used = {"ep": 1, "cp": 1, "redundant": 0, "expert_budget": 0}  # these only when used
    layout = {k: v for k, v in asdict(c.layout).items() if k not in used or v > used[k]}
    out: dict[str, Any] = {"layout": layout, "rejected": c.rejected, "reason": c.reason}
    if c.memory is not None:
        out["memory"] = {**asdict(c.memory), "max_batch": c.memory.max_batch}
    if c.estimate is not None:
        e = c.estimate
        out["estimate"] = {"prefill": e.prefill.as_dict(), "decode": e.decode.as_dict(),
                           "throughput": e.throughput, "per_device": e.per_device}
    return out


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain data, for machines (`meshlm plan --json`)."""
    return {"model": plan.model, "cluster": plan.cluster, "dtype": plan.dtype,
            "weights": plan.weights.describe(plan.dtype),
            "workload": asdict(plan.workload),
            "chosen": candidate_json(plan.chosen) if plan.chosen else None, "binding": plan.binding,
            "fix": plan.fix, "ranked": [candidate_json(c) for c in plan.ranked],
            "rejected": [candidate_json(c) for c in plan.rejected]}


def dry_run(cfg: ModelConfig, layout: Layout, cluster: Cluster, work: Workload, dtype: str,
            kv_budget: float | None = None, weights: WeightFormat | None = None) -> tuple[bool, str]:
    """Check a layout before any process starts: heads, memory, KV against the longest request; the fix."""
    weights = weights or WeightFormat()
    lines = [f"dry run: {layout} on {cluster.name}, {dtype} compute, weights {weights.describe(dtype)}; "
             "no process started, no weights loaded"]
    if layout.world > cluster.devices:
        lines.append(f"note: {layout.world} ranks on {cluster.devices} devices: ranks share devices"
                     + (f" (cores); the cost model gives each rank its share of the cores while more than "
                        f"{cluster.devices} compute at once (their compute takes ranks computing / "
                        f"{cluster.devices} times as long)" if cluster.node.shared_memory and cluster.nodes == 1
                        else ", and the predicted timings assume a device each"))
    try:
        ParallelDims(dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep).check_model(cfg)
    except ConfigError as e:
        return False, "\n".join(lines + [f"FAIL heads/layers/experts: {e}"])
    first = [s for s in rank_shares(cfg, layout, dtype) if s.stage == 0]
    lines.append(f"heads per tp rank: q {'+'.join(str(s.q_heads) for s in first)} of {cfg.num_heads}, "
                 f"kv {'+'.join(str(s.kv_heads) for s in first)} of {cfg.num_kv_heads}"
                 + (" (uneven split)" if len({s.q_heads for s in first}) > 1 else ""))
    mem = check(cfg, layout, cluster, work, dtype, kv_budget, weights)
    lines.append(memory_line(mem))
    if mem.ok:
        try:
            e = estimate(cfg, layout, cluster, work, dtype, weights)
            guess = (f"; predicted TTFT {ms(e.prefill.total)} ms, TPOT {ms(e.decode.total)} ms on "
                     f"{cluster.name}")
        except ConfigError as err:  # the profile lacks this dtype's rate: the check stands without timings
            guess = f" (no timings: {err})"
        lines.append(f"OK: KV holds {mem.kv_tokens:,} tokens >= {mem.kv_needed:,} needed{guess}")
        return True, "\n".join(lines)
    lines.append(f"FAIL {mem.reason}")
    fits = fitting_layout(cfg, cluster, work, dtype, kv_budget, weights)
    if fits is not None and fits != layout:
        lines.append(f"the smallest layout of this machine that fits: {fits} (run with --tp {fits.tp} "
                     f"--pp {fits.pp}" + (f" --cp {fits.cp}" if fits.cp > 1 else "") + ")")
    return False, "\n".join(lines)


def fitting_layout(cfg: ModelConfig, cluster: Cluster, work: Workload, dtype: str,
                   kv_budget: float | None = None, weights: WeightFormat | None = None) -> Layout | None:
    """The one-replica layout with the fewest ranks (then the fewest stages, the most tp) whose heads and memory
    fit; cp before pp, since a context whose KV does not fit one rank also prefills faster split by cp."""
    n = cluster.devices
    candidates = [Layout(1, pp, tp, cp=cp) for tp in range(1, n + 1) for pp in range(1, n // tp + 1)
                  for cp in range(1, n // (tp * pp) + 1)]
    for lay in sorted(candidates, key=lambda x: (x.model_ranks, x.pp, x.cp)):
        try:
            ParallelDims(pp=lay.pp, tp=lay.tp).check_model(cfg)
        except ConfigError:
            continue
        if not spans_nodes(lay, cluster) and check(cfg, lay, cluster, work, dtype, kv_budget, weights).ok:
            return lay
    return None
