"""Cost model: per-stage roofline compute, alpha-beta collectives, pipeline bubbles; TTFT, TPOT, throughput.

One forward of T tokens on a rank is a sum of rooflines, max(FLOPs / rate, bytes / bandwidth), over its
parts (the layers' matmuls, attention over the cached keys at the attention kernels' rate, the vocab head
for sampled rows), plus the elementwise traffic of activations (norms, rotary, SiLU, residuals: passes
over [T, H], [T, I] and [T, q/k/v] at memory bandwidth), plus a software overhead per layer and per step.
Prefill is compute-bound, decode bandwidth-bound: a decode step streams every weight of the stage once.
A tensor-parallel stage adds, per forward, an all-reduce of the [T, H] embedding output on the first
stage, two per layer (after o_proj and down_proj), and the all-gather of the sampled rows' fp32 logits
on the last stage. Collectives are alpha-beta on the link
the group crosses (ring): all-reduce 2(p-1)a + 2(p-1)/p n/b, all-gather (p-1)a + (p-1)/p n/b, a hop a + n/b;
each collective of a group also pays its in-engine wait, Link.wait(compute since the last one), and the
compute between two collectives takes Link.slow(its roofline seconds) longer over that transport (gloo's
threads share the ranks' cores), both calibrated in the engine (probe.py). A pipeline hop costs the
link's ping-pong latency once (Link.hop) + n/b.
A pp > 1 stage's layers cost the pipeline loop's per-layer overhead (Device.pipeline_layer_overhead).

More ranks than cores (a CPU host, node.shared_memory): while `a` ranks compute at once on `c` cores each
gets c / a of a core, so a stage's compute and its collectives (the peers' copies, reductions and waits
run on the same cores) take a / c times as long (`slowdown`). Ranks that compute at
once: tp x dp x the stages busy together (one stage per micro-batch in flight; a prefill's pieces fill
and drain the pipeline, so the stages busy together are counted slot by slot).

Pipelines (the seed articles' equation): latency ~ max(stage time) x bubble factor + exposed transfers.
  prefill, n = micro-batches x chunks pieces:  TTFT = sum_s t_s + (n - 1) max_s t_s + hops
  decode, M micro-batches in flight:           TPOT = max(M max_s t_s, sum_s t_s + hops)
  throughput = dp x batch / TPOT  (tokens/s; per device: / world)
With pp = 1 the paged engine runs ceil(batch x prompt / max_batched_tokens) prefill steps, then one step per
token, each after broadcasting its input to every rank (the control term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshlm.config import ModelConfig
from meshlm.plan.cluster import Cluster, Link
from meshlm.plan.layout import BYTES, Layout, RankShare, Workload, rank_shares

# Elementwise passes per layer (each reads or writes the tensor once), counted from meshlm's Llama layer:
ACT_H = 18  # over [T, H]: two RMSNorms (~6 passes each), two residual adds
ACT_I = 5  # over [T, I_local]: SiLU and the gate x up product
ACT_QKV = 8  # over [T, (q + 2 kv) x D]: rotary embedding, the KV cache write, layout changes
CONTROL_BYTES = 256  # the pickled step input, plus 8 bytes per token
HEADER_MESSAGES = 2  # a pipeline hop sends a header, then the payload


@dataclass(frozen=True)
class Terms:
    """Seconds of one phase on its critical path, by cause; total = the phase's latency."""

    compute: float  # the critical stage's forward passes
    collectives: float  # its tensor-parallel all-reduces and all-gathers
    control: float  # per-step broadcast of the step's input (pp = 1 engine)
    p2p: float  # pipeline hops on the critical path
    bubble: float  # the critical stage idle, waiting for the others
    stage_max: float  # slowest stage's time per piece (compute + collectives)
    pieces: float  # pieces the slowest stage works through: steps, micro-batches x chunks
    bound: str  # "compute" or "bandwidth": the roofline side of the compute term

    @property
    def total(self) -> float:
        """The phase's latency in seconds."""
        return self.compute + self.collectives + self.control + self.p2p + self.bubble

    @property
    def factor(self) -> float:
        """Bubble factor: pieces plus the bubble in units of the slowest stage's time."""
        return self.pieces + (self.bubble / self.stage_max if self.stage_max > 0 else 0.0)

    def as_dict(self) -> dict[str, float | str]:
        """Plain numbers, with the total."""
        return {"compute": self.compute, "collectives": self.collectives, "control": self.control,
                "p2p": self.p2p, "bubble": self.bubble, "total": self.total, "stage_max": self.stage_max,
                "pieces": self.pieces, "factor": self.factor, "bound": self.bound}


@dataclass(frozen=True)
class Estimate:
    """Predicted latency terms and throughput of a layout under a workload."""

    layout: Layout
    prefill: Terms  # TTFT of the workload's batch
    decode: Terms  # TPOT: one token for every sequence of the batch
    throughput: float  # decode tokens/s over all replicas
    per_device: float  # throughput / world

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
    """What one rank achieves: matmul and attention FLOP/s, streaming bytes/s; bytes per element."""

    matmul: float
    attention: float
    bandwidth: float
    elem: int
    layer_overhead: float


def _roof(flops: float, nbytes: float, rate: float, bw: float) -> tuple[float, bool]:
    return max(flops / rate, nbytes / bw), flops / rate >= nbytes / bw


def forward_seconds(cfg: ModelConfig, share: RankShare, work: Pass, r: Rates) -> tuple[float, str]:
    """Seconds of one forward on one rank, and which roofline side bounds its largest part."""
    h, d, elem = cfg.hidden_size, cfg.head_dim, r.elem
    attn_w = 2 * h * share.q_heads * d + 2 * h * share.kv_heads * d
    experts = max(1, cfg.num_experts)
    touched = min(experts, max(1.0, work.tokens * cfg.num_experts_per_tok)) if cfg.is_moe else 1
    mlp_active = 3 * h * share.inter * (cfg.num_experts_per_tok if cfg.is_moe else 1)
    mlp_read = 3 * h * share.inter * touched + h * cfg.num_experts
    linear, lb = _roof(2 * work.tokens * (attn_w + mlp_active) * share.layers,
                       (attn_w + mlp_read) * share.layers * elem, r.matmul, r.bandwidth)
    attn, ab = _roof(4 * share.q_heads * d * work.pairs * share.layers,
                     2 * share.kv_heads * d * work.kv_read * share.layers * elem, r.attention, r.bandwidth)
    head, _ = _roof(2 * work.rows * share.head_params, share.head_params * elem, r.matmul, r.bandwidth)
    passes = ACT_H * h + ACT_I * share.inter + ACT_QKV * (share.q_heads + 2 * share.kv_heads) * d
    act = work.tokens * passes * share.layers * elem / r.bandwidth
    compute_bound = lb if linear >= attn else ab
    total = linear + attn + head + act + share.layers * r.layer_overhead
    return total, "compute" if compute_bound else "bandwidth"


@dataclass(frozen=True)
class StageCost:
    """One stage's seconds per piece: the slowest tp rank's compute, and the stage's tp collectives."""

    compute: float
    collectives: float
    bound: str

    @property
    def total(self) -> float:
        """Compute plus collectives (nothing overlaps on the critical path)."""
        return self.compute + self.collectives


class Model:
    """Costs of a (model, layout, cluster, dtype): stage times, hops and the two phases."""

    def __init__(self, cfg: ModelConfig, layout: Layout, cluster: Cluster, dtype: str) -> None:
        self.cfg, self.layout, self.cluster, self.dtype = cfg, layout, cluster, dtype
        self.elem = BYTES[dtype]
        dev, node = cluster.node.device, cluster.node
        bw = dev.bandwidth * dev.bandwidth_eff
        if node.memory_bandwidth:
            bw = min(bw, node.memory_bandwidth / min(node.devices, layout.world))
        rate = dev.rate(dtype)
        per_layer = dev.pipeline_layer_overhead if layout.pp > 1 and dev.pipeline_layer_overhead else \
            dev.layer_overhead
        self.rates = Rates(rate, rate * dev.attention_eff, bw, self.elem, per_layer)
        self.shares = rank_shares(cfg, layout, dtype)
        tp, pp, world = layout.tp, layout.pp, layout.world
        # Stage hops go through torch.distributed (gloo, NCCL), never shared memory; the per-step control
        # message takes the transport the tensor-parallel group takes (executor.control_comm).
        base = next((ln.transport for ln in node.links if ln.transport != "shm"), None)
        slowest = lambda links: max(links, key=lambda ln: ln.time(1 << 20))
        self.tp_link = slowest(cluster.link_between(list(range(g, g + tp))) for g in range(0, world, tp))
        rank = lambda d, s, i: (d * pp + s) * tp + i  # mesh.py's rank layout, tp fastest
        self.hops = [slowest(cluster.link_between([rank(d, s, i), rank(d, (s + 1) % pp, i)], base)
                             for d in range(layout.dp) for i in range(tp))
                     for s in range(pp)]  # hop s: stage s -> s + 1 (the last: back to stage 0)
        self.control_link = cluster.link_between(list(range(layout.model_ranks)))

    def tp_calls(self, s: int) -> int:
        """Tensor-parallel collectives per forward of stage s: two per layer (after o_proj and down_proj),
        the embedding's all-reduce on the first stage, the logits' all-gather on the last."""
        layers = next(r.layers for r in self.shares if r.stage == s)
        return 2 * layers + (s == 0) + (s == self.layout.pp - 1)

    def stage(self, s: int, work: Pass, slowdown: float = 1.0) -> StageCost:
        """Seconds of stage s for one forward of `work`, `slowdown` times longer (cores shared)."""
        dev, cfg, tp = self.cluster.node.device, self.cfg, self.layout.tp
        best = max((forward_seconds(cfg, r, work, self.rates) for r in self.shares if r.stage == s),
                   key=lambda x: x[0])
        layers = next(r.layers for r in self.shares if r.stage == s)
        row = work.tokens * cfg.hidden_size * self.elem
        coll = 2 * layers * all_reduce(self.tp_link, tp, row)
        if s == 0:
            coll += all_reduce(self.tp_link, tp, row)
        if s == self.layout.pp - 1:
            coll += all_gather(self.tp_link, tp, work.rows * cfg.vocab_size * 4)
        calls = self.tp_calls(s)
        compute = best[0]
        if tp > 1:  # the transport's own cost on the compute between calls, then each call's wait for
            # the slowest peer of that compute (both measured in the engine: Link.slows, Link.waits)
            segment = best[0] / calls
            segment += self.tp_link.slow(segment)
            compute = calls * segment
            coll += calls * self.tp_link.wait(segment)
        return StageCost((compute + dev.step_overhead) * slowdown, coll * slowdown, best[1])

    def hop(self, s: int, tokens: float) -> float:
        """Seconds for stage s to hand `tokens` hidden rows to the next stage (header, then payload)."""
        ln = self.hops[s]
        latency = ln.hop or HEADER_MESSAGES * ln.latency  # the ping-pong's one-way time, once per hop
        return latency + tokens * self.cfg.hidden_size * self.elem / ln.bandwidth

    def slowdown(self, stages: float) -> float:
        """How many times longer compute takes while `stages` stages compute at once (>= 1; cores shared)."""
        node = self.cluster.node
        if not node.shared_memory or self.cluster.nodes > 1:
            return 1.0
        return max(1.0, stages * self.layout.tp * self.layout.dp / node.devices)

    def control(self, tokens: float) -> float:
        """Broadcast of one engine step's input to every rank of a replica (gloo: size, then payload)."""
        messages = 1 if self.control_link.transport == "shm" else 2
        return messages * broadcast(self.control_link, self.layout.model_ranks, CONTROL_BYTES + 8 * tokens)

    def prefill(self, work: Workload) -> Terms:
        """TTFT of the workload's batch of prompts."""
        b, p, pp = work.batch, work.prompt_tokens, self.layout.pp
        pairs = b * p * (p + 1) / 2
        if pp == 1:
            n = math.ceil(b * p / work.max_batched_tokens)
            st = self.stage(0, Pass(b * p / n, pairs / n, b * p / n, b / n), self.slowdown(1))
            ctl = self.control(b * p / n) if self.layout.model_ranks > 1 else 0.0
            return Terms(n * st.compute, n * st.collectives, n * ctl, 0.0, 0.0, st.total, n, st.bound)
        from meshlm.parallel.pipeline import auto_chunks

        m = work.micro_batches or min(b, pp)
        rows = math.ceil(b / m)
        c = work.prefill_chunks or auto_chunks(p, pp, m, 128)
        piece = Pass(rows * p / c, rows * p * (p + 1) / 2 / c, rows * p / c, rows / c)
        stages = [self.stage(s, piece) for s in range(pp)]
        crit = max(stages, key=lambda x: x.total)
        hops = sum(self.hop(s, piece.tokens) for s in range(pp - 1)) + self.hop(pp - 1, 0)
        n = m * c
        # slot k of the n + pp - 1: the stages busy together, and how much longer sharing cores makes it
        extra = [self.slowdown(min(k + 1, pp, n, n + pp - 1 - k)) - 1 for k in range(n + pp - 1)]
        ci = stages.index(crit)
        mine = sum(extra[ci:ci + n])  # the slots the critical stage computes in
        busy = (n + mine) * crit.total
        total = sum(x.total for x in stages) + (n - 1 + sum(extra)) * crit.total + hops
        return Terms((n + mine) * crit.compute, (n + mine) * crit.collectives, 0.0, hops,
                     total - busy - hops, crit.total, n, crit.bound)

    def decode(self, work: Workload) -> Terms:
        """TPOT: one step that gives every sequence of the batch its next token."""
        b, pp = work.batch, self.layout.pp
        ctx = work.prompt_tokens + work.output_tokens / 2  # keys per sequence, on average
        if pp == 1:
            st = self.stage(0, Pass(b, b * ctx, b * ctx, b), self.slowdown(1))
            ctl = self.control(b) if self.layout.model_ranks > 1 else 0.0
            return Terms(st.compute, st.collectives, ctl, 0.0, 0.0, st.total, 1.0, st.bound)
        m = work.micro_batches or min(b, pp)
        rows = math.ceil(b / m)
        slow = self.slowdown(min(m, pp))  # one stage per micro-batch in flight
        stages = [self.stage(s, Pass(rows, rows * ctx, rows * ctx, rows), slow) for s in range(pp)]
        crit = max(stages, key=lambda x: x.total)
        hops = sum(self.hop(s, rows) for s in range(pp))
        cycle = sum(x.total for x in stages) + hops
        busy = m * crit.total
        exposed = hops if cycle > busy else 0.0
        total = max(busy, cycle)
        return Terms(m * crit.compute, m * crit.collectives, 0.0, exposed, total - busy - exposed, crit.total,
                     m, crit.bound)


def estimate(cfg: ModelConfig, layout: Layout, cluster: Cluster, work: Workload, dtype: str) -> Estimate:
    """Predicted TTFT and TPOT terms and throughput of `layout` serving `work`."""
    model = Model(cfg, layout, cluster, dtype)
    pre, dec = model.prefill(work), model.decode(work)
    tput = layout.dp * work.batch / dec.total
    return Estimate(layout, pre, dec, tput, tput / layout.world)
