"""A layout (dp x pp x tp, ep over the tp ranks), a workload, and what each rank holds (uneven shards included).

Shares come from the same functions the loader uses (parallel/partition.py: head_partition,
even_partition, plan_stages), so the planner sizes exactly what a rank will load: query heads travel with
their KV group, KV heads are replicated when tp exceeds their count, the MLP and the vocabulary split
evenly (MoE experts: a slice of each, or at ep = tp whole experts per rank), the embedding sits on stage 0
and the norm and head on the last stage.

Experts beyond one copy each: with --redundant-experts R at ep > 1 a rank holds up to its balancer slots,
min(E, ceil(E / ep) + ceil(R / ep)) experts per MoE layer (eplb.py's default budget), and is sized for them
all. With --expert-budget B (tp = 1) the experts leave the weights for one pool of resident experts per rank,
min(all of its experts, max(1, B // bytes of one expert)) of them in the compute dtype (engine/expert_buffer.py);
the rest stay in host memory and cost a read per miss (plan/cost.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meshlm.config import ModelConfig
from meshlm.errors import ConfigError
from meshlm.parallel.partition import even_partition, head_partition, plan_stages
from meshlm.plan.weights import FLOAT_BYTES, WeightFormat

BYTES = FLOAT_BYTES  # per element of the compute dtype: activations, KV cache, float weights
OBJECTIVES = ("throughput", "ttft", "tpot")


@dataclass(frozen=True, order=True)
class Layout:
    """Degrees of data, pipeline, tensor and context parallelism; ranks are laid out tp fastest (mesh.py)."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    ep: int = 1  # expert parallelism over the tp ranks of a stage (mesh.py): ep > 1 means ep == tp
    cp: int = 1  # context parallelism: each rank holds 1/cp of every sequence's KV
    redundant: int = 0  # ep > 1: extra expert copies per ep group (--redundant-experts)
    expert_budget: int = 0  # bytes of resident experts per rank (--expert-budget, tp = 1); 0: every expert resident

    def __post_init__(self) -> None:
        from meshlm.parallel.mesh import ParallelDims

        object.__setattr__(self, "tp", ParallelDims(tp=self.tp, ep=self.ep).tp)  # ep=N alone implies tp=N
        if self.redundant < 0 or self.expert_budget < 0:
            raise ConfigError(f"redundant experts {self.redundant} and expert budget {self.expert_budget} must "
                              "be >= 0.")
        if self.redundant and self.ep == 1:
            raise ConfigError("--redundant-experts places whole experts: it needs --ep > 1.")
        if self.expert_budget and self.tp > 1:
            raise ConfigError(f"--expert-budget {self.expert_budget} buffers whole experts on one rank per stage: "
                              "it needs --tp 1 and --ep 1.")

    @property
    def model_ranks(self) -> int:
        """Ranks serving one replica (pp x cp x tp)."""
        return self.pp * self.cp * self.tp

    @property
    def world(self) -> int:
        """All ranks."""
        return self.dp * self.pp * self.cp * self.tp

    def __str__(self) -> str:
        return (f"dp={self.dp} pp={self.pp} tp={self.tp}" + (f" ep={self.ep}" if self.ep > 1 else "")
                + (f" cp={self.cp}" if self.cp > 1 else "")
                + (f" redundant={self.redundant}" if self.redundant else "")
                + (f" expert-budget={self.expert_budget / 1e6:,.1f}MB" if self.expert_budget else ""))

    @classmethod
    def parse(cls, text: str) -> Layout:
        """'tp=2,pp=1' (any order, dp/pp/tp/ep; missing degrees are 1; ep=N implies tp=N) -> Layout."""
        degrees: dict[str, int] = {}
        for part in text.replace(" ", ",").split(","):
            if not part:
                continue
            key, _, value = part.partition("=")
            if key not in ("dp", "pp", "tp", "ep", "cp") or not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--layout {text!r}: expected degrees like tp=2,pp=1 (dp, pp, tp, ep, cp >= 1).")
            degrees[key] = int(value)
        return cls(**degrees)


@dataclass(frozen=True)
class Workload:
    """What the layout must serve: request shape, concurrency, objective and service-level targets."""

    prompt_tokens: int = 512
    output_tokens: int = 128
    batch: int = 1  # sequences decoded together per replica
    objective: str = "throughput"  # throughput (tokens/s per device) | ttft | tpot
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    max_batched_tokens: int = 2048  # tokens per engine step (prefill chunk), SchedulerConfig's default
    prefill_chunks: int | None = None  # steps a group's prompts take at pp > 1; None = by max_batched_tokens
    expert_hit_rate: float | None = None  # --expert-budget: share of expert uses found resident (measured:
    # meshlm_expert_buffer_hits / uses); None: the resident share (uniform routing; a skewed one does better)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} is unknown; use one of {', '.join(OBJECTIVES)}.")
        if min(self.prompt_tokens, self.output_tokens, self.batch, self.max_batched_tokens) < 1:
            raise ConfigError("prompt_tokens, output_tokens, batch and max_batched_tokens must be >= 1.")
        if self.expert_hit_rate is not None and not 0 <= self.expert_hit_rate <= 1:
            raise ConfigError(f"expert_hit_rate {self.expert_hit_rate} is a share of expert uses: give 0 to 1.")

    @property
    def context(self) -> int:
        """Tokens of the longest request: prompt plus output."""
        return self.prompt_tokens + self.output_tokens

    @classmethod
    def parse(cls, text: str | None) -> Workload:
        """A JSON/YAML file, or inline 'prompt=2048,output=256,batch=16,objective=ttft,slo_tpot_ms=50'."""
        if not text:
            return cls()
        if Path(text).exists():
            raw = Path(text).read_text()
            if text.endswith((".yaml", ".yml")):
                import yaml

                d: dict[str, Any] = yaml.safe_load(raw)
            else:
                d = json.loads(raw)
        else:
            d = dict(p.split("=", 1) for p in text.split(",") if "=" in p)
        alias = {"prompt": "prompt_tokens", "output": "output_tokens", "slo_ttft_ms": "slo_ttft_s",
                 "slo_tpot_ms": "slo_tpot_s"}
        names = {f.name: f.type for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, value in d.items():
            name = alias.get(key, key)
            if name not in names:
                raise ConfigError(f"workload field {key!r} is unknown; use {', '.join(names)} (or prompt, "
                                  "output, slo_ttft_ms, slo_tpot_ms).")
            if name == "objective":
                out[name] = str(value)
            elif name.startswith("slo_"):
                out[name] = float(value) / (1000.0 if key.endswith("_ms") else 1.0)
            elif name == "expert_hit_rate":
                out[name] = float(value)
            else:
                out[name] = int(value)
        return cls(**out)


@dataclass(frozen=True)
class RankShare:
    """What one rank (stage s, tp index i) holds: heads, parameters, KV bytes per token."""

    stage: int
    tp_index: int
    layers: int
    q_heads: int
    kv_heads: int
    inter: int  # this rank's slice of the MLP's intermediate size (at ep > 1: expert_inter / ep, the average)
    params: int  # parameters stored on this rank
    layer_params: int  # of which in one decoder layer (the matmul weights a token streams)
    head_params: int  # the vocab-parallel head on the last stage (0 elsewhere)
    kv_bytes_per_token: int  # per token of context: at cp > 1 the rank holds 1/cp of the tokens
    weight_bytes: float  # bytes of every weight stored on this rank, each in its format
    matmul_bytes: float  # bytes per weight of the decoder layers' matmuls (what a decode step streams)
    head_bytes: float  # bytes per weight of the embedding / output head
    experts: int = 0  # routed expert copies this rank serves, over its layers (replicas included)
    resident: int = 0  # of which in memory (< experts only with an expert budget; the rest read per miss)
    expert_bytes: float = 0.0  # one expert (w1, w3, w2) as stored in host memory: what a miss reads


def stage_sizes(cfg: ModelConfig, pp: int) -> list[int]:
    """Layers per stage as the pipeline will split them (its cost-balanced default)."""
    return [p.stop - p.start for p in plan_stages(cfg, pp)]


def rank_shares(cfg: ModelConfig, layout: Layout, dtype: str,
                weights: WeightFormat | None = None) -> list[RankShare]:
    """Every (stage, tp index) share of one replica, exact under meshlm's uneven splits; weights in
    `weights`' formats (default: all in dtype), norms, biases and routers in dtype."""
    h, d, tp, elem = cfg.hidden_size, cfg.head_dim, layout.tp, BYTES[dtype]
    weights = weights or WeightFormat()
    wb, eb = weights.layer_bytes(dtype), weights.embed_bytes(dtype)
    heads = head_partition(cfg.num_heads, cfg.num_kv_heads, tp)
    inter = even_partition(cfg.intermediate_size, tp)
    vocab = even_partition(cfg.vocab_size, tp)
    experts = even_partition(cfg.num_experts, tp)  # Placement.contiguous at ep = tp
    slots = min(cfg.num_experts, -(-cfg.num_experts // tp) + -(-layout.redundant // tp))  # balancer's budget
    expert_inter = even_partition(cfg.expert_inter, tp)
    one_expert = 3 * h * cfg.expert_inter if cfg.is_moe else 0
    sizes = stage_sizes(cfg, layout.pp)
    out = []
    for s, n_layers in enumerate(sizes):
        first, last = s == 0, s == len(sizes) - 1
        for i in range(tp):
            q, kv = heads[i].num_q, heads[i].kv_end - heads[i].kv_start
            i_local, v_local = inter[i][1] - inter[i][0], vocab[i][1] - vocab[i][0]
            attn = 2 * h * q * d + 2 * h * kv * d
            bias = (q + 2 * kv) * d if cfg.attention_bias else 0
            bias += h if cfg.attention_out_bias else 0
            bias += 2 * i_local + h if cfg.mlp_bias else 0
            held = cfg.num_experts
            if cfg.is_moe and layout.ep > 1:  # whole experts per rank; a routed row costs a whole expert
                i_local = cfg.expert_inter // tp  # per routed token, on average over the ranks
                held = experts[i][1] - experts[i][0]
                held = max(held, slots) if layout.redundant else held
                routed = one_expert * held
            elif cfg.is_moe:  # a slice of every expert
                i_local = expert_inter[i][1] - expert_inter[i][0]
                routed = 3 * h * i_local * cfg.num_experts
            if cfg.is_moe:
                shared = even_partition(cfg.shared_expert_intermediate_size, tp)[i]
                matmul = attn + routed + 3 * h * (shared[1] - shared[0])
            else:
                matmul = attn + 3 * h * i_local
            small = bias + h * cfg.num_experts + 2 * h  # biases, MoE router, two norms
            layer = matmul + small
            head = v_local * h if last else 0
            embed = v_local * h if first and not (last and cfg.tie_word_embeddings) else 0
            params = n_layers * layer + embed + head + (h if last else 0)
            nbytes = n_layers * (matmul * wb + small * elem) + (embed + head) * eb + (h * elem if last else 0)
            copies = n_layers * held if cfg.is_moe else 0
            resident = copies
            if copies and layout.expert_budget:  # one pool of whole experts in the compute dtype (expert_buffer)
                resident = min(copies, max(1, layout.expert_budget // (one_expert * elem)))
                nbytes += resident * one_expert * elem - n_layers * routed * wb
            out.append(RankShare(s, i, n_layers, q, kv, i_local, params, layer, head,
                                 -(-2 * n_layers * kv * d * elem // layout.cp), nbytes, wb, eb, copies, resident,
                                 one_expert * wb))
    return out


def largest_share(cfg: ModelConfig, layout: Layout, dtype: str, weights: WeightFormat | None = None) -> RankShare:
    """The rank that holds the most bytes (weights, then KV per token): memory is sized for it."""
    return max(rank_shares(cfg, layout, dtype, weights), key=lambda r: (r.weight_bytes, r.kv_bytes_per_token))
