"""Cost model of the engine that runs: per-stage roofline compute, alpha-beta messages, the pipeline's steps
in flight; TTFT, TPOT, throughput.

One forward of T tokens on a rank is a sum of rooflines, max(FLOPs / rate, bytes / bandwidth), over its
parts (the layers' matmuls, attention over the cached keys at the attention kernels' rate, the vocab head
for sampled rows), plus the elementwise traffic of activations (norms, rotary, SiLU, residuals: passes
over [T, H], [T, I] and [T, q/k/v] at memory bandwidth), plus a software overhead per layer and per step.
Prefill is compute-bound, decode bandwidth-bound: a decode step streams every weight of the stage once,
each at its storage format's bytes (plan/weights.py: Q4_0 18/32 bytes a weight, F32 4), read at the
device's streaming rate for the compute dtype; matmul FLOPs run at the compute dtype's rate.
A tensor-parallel stage adds, per forward, an all-reduce of the [T, H] embedding output on the first
stage, two per layer (after o_proj and down_proj), and the all-gather of the sampled rows' fp32 logits on
the last stage: ring all-reduce 2(p-1)a + 2(p-1)/p n/b, all-gather (p-1)a + (p-1)/p n/b on the link the
group crosses. At ep = tp the MoE layer's all-reduce becomes: an all-gather of the row counts, two
all-to-all-v (dispatch, combine: each rank sends its T/ep tokens x K rows, (p-1)a + (p-1)/p n/b) and the
all-gather of the [T, H] token shares (parallel/expert.py).
A sparse MoE layer also costs its calls beyond their bytes (the router, top-k, one index / three matmuls /
index_add per expert run, the combine; small against the bytes at large batch, not at batch 1): per MoE layer
and forward, on the rank's MoE code path (node figures, measured by calibrate.moe_overhead),
  ep = 1 (tp or not):  moe_overhead + expert_overhead x min(E, tokens x K)      (every rank runs every touched
                       expert, or its slice of it)
  ep > 1:              ep_moe_overhead + ep_expert_overhead x max(1, min(E, tokens x K) / ep)   (parallel/
                       expert.py's bookkeeping; a rank runs its share of the touched experts, the average rank's)
Dense layers pay nothing of it (a dense model's figures are unchanged by it).
With an expert budget (layout.expert_budget, tp = 1) each forward reads its misses from host memory:
  fetch = layers x min(E, tokens x K) experts touched x (1 - hit rate) x bytes of one stored expert / host_read
(hit rate: the workload's measured one, else resident / held experts; host_read: the node's, else a CPU host's
streaming rate or PCIe on a GPU node); no overlap with compute is assumed (the read-ahead hides some).
Every engine step first sends its input (StepInput) to the ranks: at pp = 1 a broadcast to every rank
(control), at pp > 1 a tp broadcast on stage 0, then each hop carries a header, the pickled
step and the hidden rows [T, H] (3 messages over the pipeline's torch.distributed link, never shm), and
the last stage answers rank 0 (header and sampled tokens: 2 messages).

The engine at pp > 1 (engine/engine.py, scheduler.py) keeps up to pp steps in flight and gives each step
a 1/pp share of the live requests, so a batch of b runs as m = ceil(b / ceil(b / pp)) groups of
r = ceil(b / pp) rows:
  decode:   TPOT = max(m x slowest stage, sum of stages + hops)   (m groups share each stage; one group
            alone pays the whole trip)
  prefill:  n = m groups x c chunks (the engine's equal-cost prompt chunks, and a step holds at most
            max_batched_tokens tokens), pipelined:
            TTFT = sum of stages + (n - 1) x slowest stage + hops
  pp = 1:   TTFT = ceil(b x prompt / max_batched_tokens) steps; TPOT = one step of b rows.
  throughput = dp x b / TPOT  (tokens/s; per device: / devices used)
Context parallelism (cp) works inside each stage: a prefill step's tokens and attention pairs split over the
stage's cp ranks, and each stage adds its own pass-KV ring (per layer cp - 1 hops of a KV block of context /
cp tokens, none hidden); a decode's rows are replicated, each cp rank attends to 1/cp of the keys and the
stage adds a per-layer all-gather of the partials. At pp > 1 stage 0's tp ranks also broadcast each step to
their cp peers, and each cp rank hands its own rows to the next stage's same cp index (hops in parallel).

A CPU host (node.shared_memory): a device is one core and each rank runs cores // ranks threads (at least
one), meshlm's default; a rank's matmul rate and bandwidth are its threads' (bandwidth scaled by the
node's thread_scaling: one process's threads share each GEMV's fork and join; the node's bandwidth cap
shared by the ranks streaming at once). More ranks computing at once than cores time-share them: compute
and collectives take (busy ranks x threads) / cores times as long (`slowdown`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshlm.config import ModelConfig
from meshlm.parallel.partition import MIN_CHUNK, auto_chunks, plan_stages
from meshlm.plan.cluster import PCIE_BYTES_S, Cluster, Link
from meshlm.plan.layout import BYTES, Layout, RankShare, Workload, rank_shares
from meshlm.plan.weights import WeightFormat

# Elementwise passes per layer (each reads or writes the tensor once), counted from meshlm's Llama layer:
ACT_H = 18  # over [T, H]: two RMSNorms (~6 passes each), two residual adds
ACT_I = 5  # over [T, I_local]: SiLU and the gate x up product
ACT_QKV = 8  # over [T, (q + 2 kv) x D]: rotary embedding, the KV cache write, layout changes
CONTROL_BYTES = 256  # the pickled step input, plus 8 bytes per token
HOP_MESSAGES = 3  # a pipeline hop: header, pickled step, hidden rows
REPLY_MESSAGES = 2  # the last stage to rank 0: header, sampled tokens


@dataclass(frozen=True)
class Terms:
    """Seconds of one phase on its critical path, by cause; total = the phase's latency."""

    compute: float  # the critical stage's forward passes
    collectives: float  # its tensor-parallel all-reduces and all-gathers
    control: float  # sending each step's input to the ranks
    p2p: float  # pipeline hops on the critical path
    bubble: float  # the critical stage idle, waiting for the others
    stage_max: float  # slowest stage's time per piece (compute + collectives)
    pieces: float  # steps the slowest stage works through
    bound: str  # "compute" or "bandwidth": the roofline side of the compute term
    fetch: float = 0.0  # expert buffer misses read from host memory (--expert-budget)

    @property
    def total(self) -> float:
        """The phase's latency in seconds."""
        return self.compute + self.collectives + self.control + self.p2p + self.bubble + self.fetch

    @property
    def factor(self) -> float:
        """Bubble factor: pieces plus the bubble in units of the slowest stage's time."""
        return self.pieces + (self.bubble / self.stage_max if self.stage_max > 0 else 0.0)

    def as_dict(self) -> dict[str, float | str]:
        """Plain numbers, with the total."""
        return {"compute": self.compute, "collectives": self.collectives, "control": self.control,
                "p2p": self.p2p, "bubble": self.bubble, "total": self.total, "stage_max": self.stage_max,
                "pieces": self.pieces, "factor": self.factor, "bound": self.bound, "fetch": self.fetch}


@dataclass(frozen=True)
class Estimate:
    """Predicted latency terms and throughput of a layout under a workload."""

    layout: Layout
    prefill: Terms  # TTFT of the workload's batch
    decode: Terms  # TPOT: one token for every sequence of the batch
    throughput: float  # decode tokens/s over all replicas
    per_device: float  # throughput / devices used

    def metric(self, objective: str) -> float:
        """The objective's value, lower is better (throughput negated)."""
        values = {"ttft": self.prefill.total, "tpot": self.decode.total, "throughput": -self.per_device}
        return values[objective]


def all_reduce(link: Link, p: int, nbytes: float) -> float:
    """Ring all-reduce of nbytes per rank over p ranks."""
    return 0.0 if p == 1 else 2 * (p - 1) * link.latency + 2 * (p - 1) / p * nbytes / link.bandwidth


def all_gather(link: Link, p: int, nbytes: float) -> float:
    """Ring all-gather whose output is nbytes."""
    return 0.0 if p == 1 else (p - 1) * link.latency + (p - 1) / p * nbytes / link.bandwidth


def all_to_all(link: Link, p: int, nbytes: float) -> float:
    """All-to-all-v in which each rank sends nbytes spread evenly over the p ranks (its own share stays)."""
    return 0.0 if p == 1 else (p - 1) * link.latency + (p - 1) / p * nbytes / link.bandwidth


def broadcast(link: Link, p: int, nbytes: float) -> float:
    """Tree broadcast of nbytes."""
    return 0.0 if p == 1 else math.ceil(math.log2(p)) * link.time(nbytes)


@dataclass(frozen=True)
class Pass:
    """One forward of a stage's rank: tokens, attention (query, key) pairs, KV tokens read, sampled rows."""

    tokens: float
    pairs: float
    kv_read: float
    rows: float


@dataclass(frozen=True)
class Rates:
    """What one rank achieves: matmul and attention FLOP/s, streaming bytes/s; bytes per activation element."""

    matmul: float
    attention: float
    bandwidth: float
    elem: int
    layer_overhead: float


def _roof(flops: float, nbytes: float, rate: float, bw: float) -> tuple[float, bool]:
    return max(flops / rate, nbytes / bw), flops / rate >= nbytes / bw


def experts_touched(cfg: ModelConfig, tokens: float) -> float:
    """Experts a MoE layer runs for a forward of `tokens` (each picks K; at most E, at least one); 1 if dense."""
    return min(max(1, cfg.num_experts), max(1.0, tokens * cfg.num_experts_per_tok)) if cfg.is_moe else 1


def forward_seconds(cfg: ModelConfig, share: RankShare, work: Pass, r: Rates) -> tuple[float, str]:
    """Seconds of one forward on one rank, and which roofline side bounds its largest part."""
    h, d, elem = cfg.hidden_size, cfg.head_dim, r.elem
    attn_w = 2 * h * share.q_heads * d + 2 * h * share.kv_heads * d
    touched = experts_touched(cfg, work.tokens)
    mlp_active = 3 * h * share.inter * (cfg.num_experts_per_tok if cfg.is_moe else 1)
    mlp_read = 3 * h * share.inter * touched + h * cfg.num_experts
    linear, lb = _roof(2 * work.tokens * (attn_w + mlp_active) * share.layers,
                       (attn_w + mlp_read) * share.layers * share.matmul_bytes, r.matmul, r.bandwidth)
    attn, ab = _roof(4 * share.q_heads * d * work.pairs * share.layers,
                     2 * share.kv_heads * d * work.kv_read * share.layers * elem, r.attention, r.bandwidth)
    head, _ = _roof(2 * work.rows * share.head_params, share.head_params * share.head_bytes, r.matmul,
                    r.bandwidth)
    passes = ACT_H * h + ACT_I * share.inter + ACT_QKV * (share.q_heads + 2 * share.kv_heads) * d
    act = work.tokens * passes * share.layers * elem / r.bandwidth
    compute_bound = lb if linear >= attn else ab
    total = linear + attn + head + act + share.layers * r.layer_overhead
    return total, "compute" if compute_bound else "bandwidth"


@dataclass(frozen=True)
class StageCost:
    """One stage's seconds per step: the slowest tp rank's compute, and the stage's tp collectives."""

    compute: float
    collectives: float
    bound: str
    fetch: float = 0.0  # expert buffer misses

    @property
    def total(self) -> float:
        """Compute plus collectives plus expert fetches (nothing overlaps on the critical path)."""
        return self.compute + self.collectives + self.fetch


def threads_per_rank(cluster: Cluster, layout: Layout) -> int:
    """Threads a rank runs: on a CPU host its share of the cores (at least 1), else 1 (a GPU)."""
    node = cluster.node
    if not node.shared_memory:
        return 1
    return max(1, node.devices // cluster.ranks_on_node(layout.world))


class Model:
    """Costs of a (model, layout, cluster, dtype): stage times, hops and the two phases."""

    def __init__(self, cfg: ModelConfig, layout: Layout, cluster: Cluster, dtype: str,
                 weights: WeightFormat | None = None, hit_rate: float | None = None) -> None:
        self.cfg, self.layout, self.cluster, self.dtype = cfg, layout, cluster, dtype
        self.hit_rate = hit_rate
        self.elem = BYTES[dtype]
        self.threads = threads_per_rank(cluster, layout)
        self.shares = rank_shares(cfg, layout, dtype, weights)
        node, tp, pp, cp, world = cluster.node, layout.tp, layout.pp, layout.cp, layout.world
        # Stage hops go through torch.distributed (gloo, NCCL), never shared memory; the per-step control
        # message takes the transport the tensor-parallel group takes.
        base = next((ln.transport for ln in node.links if ln.transport != "shm"), None)
        slowest = lambda links: max(links, key=lambda ln: ln.time(1 << 20))
        self.tp_link = slowest(cluster.link_between(list(range(g, g + tp))) for g in range(0, world, tp))
        rank = lambda d, s, c, i: ((d * pp + s) * cp + c) * tp + i  # mesh.py's rank layout, tp fastest
        self.hops = [slowest(cluster.link_between([rank(d, s, c, i), rank(d, (s + 1) % pp, c, i)], base)
                             for d in range(layout.dp) for c in range(cp) for i in range(tp))
                     for s in range(pp)]  # hop s: stage s -> s + 1, cp index to the same cp index (last: rank 0)
        # the ring between a stage's cp ranks (tp apart), the slowest stage's
        self.cp_link = slowest(cluster.link_between([rank(0, s, c, 0) for c in range(cp)]) for s in range(pp))
        self.control_link = cluster.link_between(list(range(layout.model_ranks)))
        self.moe_layers = [sum(cfg.is_sparse(i) for i in range(p.start, p.stop)) for p in plan_stages(cfg, pp)]

    def rates(self, busy: float) -> Rates:
        """One rank's rates while `busy` ranks of the node compute at once (they share its bandwidth)."""
        dev, node, t = self.cluster.node.device, self.cluster.node, self.threads
        # t threads of one rank reach 1 .. node.thread_scaling of linear scaling (linear in between)
        eff = 1.0 if t == 1 else 1.0 - (1.0 - node.thread_scaling) * (t - 1) / max(node.devices - 1, 1)
        bw = dev.stream(self.dtype) * t * eff
        if node.memory_bandwidth:  # the node's cap, shared by the threads (a GPU node: ranks) streaming at once
            bw = min(bw, node.memory_bandwidth * t / max(min(busy * t, node.devices), 1))
        rate = dev.rate(self.dtype) * t
        return Rates(rate, rate * dev.attention_eff, bw, self.elem, dev.layer_overhead)

    def slowdown(self, busy: float) -> float:
        """How many times longer work takes while `busy` ranks of a CPU host compute at once (>= 1)."""
        node = self.cluster.node
        if not node.shared_memory or self.cluster.nodes > 1:
            return 1.0
        return max(1.0, busy * self.threads / node.devices)

    def tp_calls(self, s: int) -> int:
        """Tensor-parallel collectives per forward of stage s: two per layer (after o_proj and down_proj),
        the embedding's all-reduce on the first stage, the logits' all-gather on the last."""
        layers = next(r.layers for r in self.shares if r.stage == s)
        return 2 * layers + (s == 0) + (s == self.layout.pp - 1)

    def fetch(self, s: int, tokens: float, busy: float) -> float:
        """Seconds stage s spends per forward of `tokens` reading expert buffer misses from host memory."""
        share = max((r for r in self.shares if r.stage == s), key=lambda r: r.experts - r.resident)
        if share.resident >= share.experts:
            return 0.0
        hit = self.hit_rate if self.hit_rate is not None else share.resident / share.experts
        touched = experts_touched(self.cfg, tokens)
        node = self.cluster.node
        rate = node.host_read or (self.rates(busy).bandwidth if node.shared_memory else PCIE_BYTES_S)
        return share.layers * touched * (1 - hit) * share.expert_bytes / rate

    def moe_calls(self, s: int, tokens: float) -> float:
        """Seconds stage s's sparse MoE layers spend per forward of `tokens` on calls beyond their bytes: per
        layer a fixed cost plus one per expert the rank runs (ep > 1: parallel/expert.py's path, the rank's
        share of the experts touched, at least one)."""
        cfg, ep, dev = self.cfg, self.layout.ep, self.cluster.node.device
        if not self.moe_layers[s]:
            return 0.0
        touched = experts_touched(cfg, tokens)
        if ep > 1:
            return self.moe_layers[s] * (dev.ep_moe_overhead + dev.ep_expert_overhead * max(1.0, touched / ep))
        return self.moe_layers[s] * (dev.moe_overhead + dev.expert_overhead * touched)

    def stage(self, s: int, work: Pass, busy: float, extra: float = 0.0) -> StageCost:
        """Seconds of stage s for one step of `work` while `busy` ranks of the node compute at once; `extra`:
        its cp ring or merge seconds, counted among the collectives."""
        dev, cfg, tp = self.cluster.node.device, self.cfg, self.layout.tp
        rates = self.rates(busy)
        best = max((forward_seconds(cfg, r, work, rates) for r in self.shares if r.stage == s),
                   key=lambda x: x[0])
        layers = next(r.layers for r in self.shares if r.stage == s)
        row = work.tokens * cfg.hidden_size * self.elem
        coll = 2 * layers * all_reduce(self.tp_link, tp, row) + extra
        if self.layout.ep > 1:  # the MLP's all-reduce becomes expert.py's counts, dispatch, combine, gather
            moe = (all_gather(self.tp_link, tp, 8 * tp * cfg.num_experts)
                   + 2 * all_to_all(self.tp_link, tp, row * cfg.num_experts_per_tok / tp)
                   + all_gather(self.tp_link, tp, row))
            coll += layers * (moe - all_reduce(self.tp_link, tp, row))
        if s == 0:
            coll += all_reduce(self.tp_link, tp, row)
            if self.layout.pp > 1:  # rank 0 hands the step to its tp peers, each of them to its cp peers
                coll += broadcast(self.tp_link, tp, CONTROL_BYTES + 8 * work.tokens)
                coll += broadcast(self.cp_link, self.layout.cp, CONTROL_BYTES + 8 * work.tokens)
        if s == self.layout.pp - 1:
            coll += all_gather(self.tp_link, tp, work.rows * cfg.vocab_size * 4)
        slow = self.slowdown(busy)
        compute = best[0] + self.moe_calls(s, work.tokens) + dev.step_overhead
        return StageCost(compute * slow, coll * slow, best[1], self.fetch(s, work.tokens, busy))

    def hop(self, s: int, tokens: float, rows: float) -> float:
        """Seconds for stage s to hand a step of `tokens` hidden rows to the next stage; the last stage's
        hop is its answer to rank 0 (`rows` sampled tokens)."""
        ln = self.hops[s]
        if s == self.layout.pp - 1:
            return REPLY_MESSAGES * ln.latency + 8 * rows / ln.bandwidth
        payload = tokens * self.cfg.hidden_size * self.elem + CONTROL_BYTES + 8 * tokens
        return HOP_MESSAGES * ln.latency + payload / ln.bandwidth

    def control(self, tokens: float) -> float:
        """pp = 1: the broadcast of one engine step's input to every rank of a replica."""
        if self.layout.model_ranks == 1:
            return 0.0
        messages = 1 if self.control_link.transport == "shm" else 2  # gloo's broadcast_object: size, payload
        return messages * broadcast(self.control_link, self.layout.model_ranks, CONTROL_BYTES + 8 * tokens)

    def groups(self, batch: int) -> tuple[int, int]:
        """(groups in flight, rows per group): the scheduler's 1/pp share of the live requests per step."""
        rows = -(-batch // self.layout.pp)
        return -(-batch // rows), rows

    def _pipeline(self, piece: Pass, busy_stages: int, extra=lambda s: 0.0) -> tuple[list[StageCost], float]:
        """Every stage's cost for one step of `piece` while `busy_stages` stages compute at once (extra(s): stage
        s's cp seconds); the hops (at cp > 1 each cp rank sends its own rows to the next stage's, in parallel)."""
        busy = busy_stages * self.layout.tp * self.layout.dp * self.layout.cp
        stages = [self.stage(s, piece, busy, extra(s)) for s in range(self.layout.pp)]
        hops = sum(self.hop(s, piece.tokens, piece.rows) for s in range(self.layout.pp))
        return stages, hops

    def ring(self, context: float, s: int = 0) -> float:
        """cp > 1: seconds of stage s's pass-KV ring in one forward, all of it counted (no overlap assumed): per
        layer of the stage cp - 1 hops, each a KV block of context / cp tokens."""
        cp = self.layout.cp
        if cp == 1:
            return 0.0
        share = max((r for r in self.shares if r.stage == s), key=lambda r: r.kv_bytes_per_token)
        block = context / cp * share.kv_bytes_per_token * cp / share.layers  # one layer's K/V of context / cp
        return share.layers * (cp - 1) * self.cp_link.time(block)

    def merge(self, rows: float, s: int = 0) -> float:
        """cp > 1: seconds of stage s's decode merges in one forward: per layer an all-gather of every cp rank's
        fp32 (out, lse) partials of `rows` replicated rows."""
        share = next(r for r in self.shares if r.stage == s)
        cp = self.layout.cp
        return share.layers * all_gather(self.cp_link, cp, cp * rows * share.q_heads * (self.cfg.head_dim + 1) * 4)

    def prefill(self, work: Workload) -> Terms:
        """TTFT of the workload's batch of prompts, arriving together (at cp > 1 each rank computes 1/cp of
        every chunk and the K/V blocks travel the ring)."""
        b, p, pp, cp = work.batch, work.prompt_tokens, self.layout.pp, self.layout.cp
        pairs = p * (p + 1) / 2
        if pp == 1:
            n = math.ceil(b * p / work.max_batched_tokens)
            piece = Pass(b * p / n / cp, b * pairs / n / cp, b * p / n, b / n)
            st = self.stage(0, piece, self.layout.tp * self.layout.dp * cp)
            ctl = self.control(b * p / n)
            ring = n * self.ring(b * p)
            return Terms(n * st.compute, n * st.collectives + ring, n * ctl, 0.0, 0.0, st.total, n, st.bound,
                         n * st.fetch)
        m, rows = self.groups(b)
        # The engine cuts each prompt into auto_chunks pieces (equal cost; parallel/pipeline.prompt_chunks),
        # and a step holds at most max_batched_tokens tokens.
        c = work.prefill_chunks or max(auto_chunks(p, pp, 1, MIN_CHUNK), math.ceil(rows * p / work.max_batched_tokens))
        n = m * c
        piece = Pass(rows * p / c / cp, rows * pairs / c / cp, rows * p / c, rows / c)
        stages, hops = self._pipeline(piece, min(n, pp), lambda s: self.ring(rows * p, s))
        crit = max(stages, key=lambda x: x.total)
        total = sum(x.total for x in stages) + (n - 1) * crit.total + hops
        busy = n * crit.total
        return Terms(n * crit.compute, n * crit.collectives, 0.0, hops, total - busy - hops, crit.total, n,
                     crit.bound, n * crit.fetch)

    def decode(self, work: Workload) -> Terms:
        """TPOT: the time in which every sequence of the batch gets its next token."""
        b, pp, cp = work.batch, self.layout.pp, self.layout.cp
        ctx = work.prompt_tokens + work.output_tokens / 2  # keys per sequence, on average
        # every cp rank attends to its 1/cp of the keys; partials all-gathered per layer (merge)
        if pp == 1:
            st = self.stage(0, Pass(b, b * ctx / cp, b * ctx / cp, b), self.layout.tp * self.layout.dp * cp)
            ctl = self.control(b)
            return Terms(st.compute, st.collectives + self.merge(b), ctl, 0.0, 0.0, st.total, 1.0, st.bound,
                         st.fetch)
        m, rows = self.groups(b)
        stages, hops = self._pipeline(Pass(rows, rows * ctx / cp, rows * ctx / cp, rows), m,
                                      lambda s: self.merge(rows, s))
        crit = max(stages, key=lambda x: x.total)
        trip = sum(x.total for x in stages) + hops
        busy = m * crit.total
        exposed = hops if trip > busy else 0.0
        total = max(busy, trip)
        return Terms(m * crit.compute, m * crit.collectives, 0.0, exposed, total - busy - exposed, crit.total,
                     m, crit.bound, m * crit.fetch)


def estimate(cfg: ModelConfig, layout: Layout, cluster: Cluster, work: Workload, dtype: str,
             weights: WeightFormat | None = None) -> Estimate:
    """Predicted TTFT and TPOT terms and throughput of `layout` serving `work` (weights: their storage)."""
    model = Model(cfg, layout, cluster, dtype, weights, work.expert_hit_rate)
    pre, dec = model.prefill(work), model.decode(work)
    tput = layout.dp * work.batch / dec.total
    return Estimate(layout, pre, dec, tput, tput / (layout.world * model.threads))
