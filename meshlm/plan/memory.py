"""Memory per rank for a layout: weights, KV cache per token, activations and workspace; what KV fits.

    need(rank) = weights + activations + reserved + kv_bytes_per_token x tokens
    usable     = device memory x memory_utilization (/ ranks on the node when they share its memory)

A layout passes when the neediest rank holds every sequence of the workload at full length (batch x
(prompt + output) tokens of KV); margin is the fraction of usable memory left over then.
Activations are one prefill step of T = min(batch x prompt, max_batched_tokens) tokens: the residual
stream and its norms, q/k/v, the MLP's gate/up/product, one layer's attention scores (fp32), and the
gathered fp32 logits of the sampled rows on the last stage.
Weights count what a rank keeps in memory (plan/layout.py): replicas of --redundant-experts included, and with
an expert budget only the resident experts; budget_that_fits() sizes the budget with which a layout fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshlm.config import ModelConfig
from meshlm.plan.cluster import GIB, Cluster
from meshlm.plan.layout import BYTES, Layout, RankShare, Workload, rank_shares
from meshlm.plan.weights import WeightFormat

GB = 1e9


@dataclass(frozen=True)
class MemoryReport:
    """Bytes on the neediest rank, the KV tokens that fit, and pass or fail with the reason."""

    rank: str  # "stage s / tp i"
    weights: float
    kv_per_token: float
    activations: float
    reserved: float
    usable: float
    kv_tokens: int  # tokens of KV that fit beside weights, activations and reserve
    kv_needed: int  # tokens the workload keeps: batch x per_seq
    per_seq: int  # tokens of the longest request (prompt + output, capped at the context window)
    ok: bool
    margin: float  # fraction of usable memory free with the workload's KV in place (negative: short)
    reason: str = ""  # why it fails, with numbers and the fix; "" when ok

    @property
    def max_batch(self) -> int:
        """Full-length sequences the KV cache holds."""
        return self.kv_tokens // max(1, self.per_seq)


def usable_bytes(cluster: Cluster, layout: Layout) -> float:
    """Memory one rank may plan with (its share of the node's when ranks share a host)."""
    dev, node = cluster.node.device, cluster.node
    sharing = cluster.ranks_on_node(layout.world) if node.shared_memory else 1
    return dev.memory * dev.memory_utilization / sharing


def activation_bytes(cfg: ModelConfig, share: RankShare, work: Workload, dtype: str, last: bool) -> float:
    """Peak transient bytes of one prefill step on this rank."""
    t = min(work.batch * work.prompt_tokens, work.max_batched_tokens)
    keys = min(work.context, max(t, work.prompt_tokens))
    hidden = t * (4 * cfg.hidden_size + (share.q_heads + 2 * share.kv_heads) * cfg.head_dim + 3 * share.inter)
    scores = share.q_heads * t * keys * 4  # fp32 attention weights of one layer
    logits = 2 * work.batch * cfg.vocab_size * 4 if last else 0
    return hidden * BYTES[dtype] + scores + logits


def check(cfg: ModelConfig, layout: Layout, cluster: Cluster, work: Workload, dtype: str,
          kv_budget: float | None = None, weights: WeightFormat | None = None) -> MemoryReport:
    """The memory report of the neediest rank; kv_budget (bytes per rank) fixes the KV pool's size;
    weights: how the weights are stored (default: in dtype)."""
    dev = cluster.node.device
    usable = usable_bytes(cluster, layout)
    shares = rank_shares(cfg, layout, dtype, weights)
    last = layout.pp - 1
    per_seq = min(work.context, cfg.max_position)
    need = work.batch * per_seq
    worst: tuple[float, MemoryReport] | None = None
    for s in shares:
        wbytes = s.weight_bytes
        act = activation_bytes(cfg, s, work, dtype, s.stage == last)
        fixed = wbytes + act + dev.reserved
        pool = (usable - fixed) if kv_budget is None else min(kv_budget, usable - fixed)
        tokens = max(0, int(pool // s.kv_bytes_per_token)) if s.kv_bytes_per_token else 10**12
        used = fixed + (need * s.kv_bytes_per_token if kv_budget is None else kv_budget)
        rep = MemoryReport(f"stage {s.stage} / tp {s.tp_index}", wbytes, s.kv_bytes_per_token, act,
                           dev.reserved, usable, tokens, need, per_seq, tokens >= need and fixed <= usable,
                           (usable - used) / usable)
        key = used - usable if rep.ok else (1e30 + used - usable)
        if worst is None or key > worst[0]:
            worst = (key, rep)
    assert worst is not None
    rep = worst[1]
    return rep if rep.ok else replace(rep, reason=_why(rep, work, cluster, layout, kv_budget is not None))


def budget_that_fits(cfg: ModelConfig, layout: Layout, cluster: Cluster, work: Workload, dtype: str,
                     weights: WeightFormat | None = None) -> int:
    """The largest --expert-budget (whole experts in dtype) with which every rank of `layout` holds its other
    weights, activations and the workload's KV; 0 when none does (no MoE, tp > 1, or not even one expert fits)."""
    if not cfg.is_moe or layout.tp > 1:
        return 0
    one = 3 * cfg.hidden_size * cfg.expert_inter * BYTES[dtype]
    shares = rank_shares(cfg, replace(layout, expert_budget=one), dtype, weights)  # one resident expert each
    usable, reserved = usable_bytes(cluster, layout), cluster.node.device.reserved
    need = work.batch * min(work.context, cfg.max_position)
    room = min(usable - (s.weight_bytes - one) - reserved - need * s.kv_bytes_per_token
               - activation_bytes(cfg, s, work, dtype, s.stage == layout.pp - 1) for s in shares)
    n = min(int(room // one), max(s.experts for s in shares))
    return n * one if n >= 1 else 0


def _why(rep: MemoryReport, work: Workload, cluster: Cluster, layout: Layout, fixed_pool: bool) -> str:
    """One paragraph: what does not fit, by how much, and what to change."""
    dev = cluster.node.device
    fixed = rep.weights + rep.activations + rep.reserved
    where = (f"{rep.usable / GB:.1f} GB usable ({dev.memory_utilization:.0%} of {dev.memory / GIB:.0f} GiB"
             + (f" shared by {cluster.ranks_on_node(layout.world)} ranks)" if cluster.node.shared_memory
                else ")"))
    if fixed > rep.usable:
        return (f"memory: rank {rep.rank} needs {rep.weights / GB:.1f} GB of weights + "
                f"{rep.activations / GB:.2f} GB of activations + {rep.reserved / GB:.1f} GB runtime = "
                f"{fixed / GB:.1f} GB, over its {where}. Fix: spread the model over more ranks (raise tp "
                "inside a node, pp across nodes), a smaller dtype or --quantize int8 / int4.")
    per_seq = rep.per_seq
    if rep.kv_tokens < per_seq:
        pool = "the KV pool (--kv-cache-mb)" if fixed_pool else "the memory left after weights"
        return (f"memory: {pool} holds {rep.kv_tokens:,} tokens of KV on rank {rep.rank} "
                f"({rep.kv_per_token / 1e3:.1f} kB each), fewer than one {per_seq:,}-token request. Fix: "
                + ("raise --kv-cache-mb, " if fixed_pool else "") + "shorten --max-context, or add ranks.")
    fits = rep.kv_tokens // per_seq
    return (f"memory: KV for {work.batch} sequences x {per_seq:,} tokens = {rep.kv_needed:,} tokens "
            f"({rep.kv_needed * rep.kv_per_token / GB:.1f} GB) does not fit on rank {rep.rank}: "
            f"{rep.kv_tokens:,} tokens do ({fits} sequences). Fix: lower the batch to {fits}, or add ranks.")
