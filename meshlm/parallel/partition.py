"""How a model splits over ranks, without torch: heads and even chunks per tp rank, layers per pipeline stage.

The loader (styles.py, pipeline.py) and the planner (meshlm/plan) both size a rank's share from these
functions, so the planner plans exactly what a rank will load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshlm.errors import ConfigError

if TYPE_CHECKING:
    from meshlm.config import ModelConfig
    from meshlm.parallel.pipeline import PipelineSpec


def even_partition(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `parts` near-equal contiguous chunks of range(n)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class HeadShard:
    """Query heads [q_start, q_end) and KV heads [kv_start, kv_end) owned by one rank."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int

    @property
    def num_q(self) -> int:
        """Query heads on this rank."""
        return self.q_end - self.q_start


def head_partition(num_heads: int, num_kv_heads: int, tp: int) -> list[HeadShard]:
    """Split attention heads over tp ranks by whole KV groups (or replicated KV heads when tp > kv)."""
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        return [HeadShard(a * group, b * group, a, b) for a, b in even_partition(num_kv_heads, tp)]
    shards = []
    for g, (r0, r1) in enumerate(even_partition(tp, num_kv_heads)):  # ranks serving KV head g
        for a, b in even_partition(group, r1 - r0):
            shards.append(HeadShard(g * group + a, g * group + b, g, g + 1))
    return shards



@dataclass(frozen=True)
class StagePlan:
    """Stage `index` of `count` owns layers [start, stop)."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def first(self) -> bool:
        """True on the stage that holds the embedding."""
        return self.index == 0

    @property
    def last(self) -> bool:
        """True on the stage that holds the final norm and the head."""
        return self.index == self.count - 1

    @property
    def layers(self) -> range:
        """Global ids of the layers this stage owns."""
        return range(self.start, self.stop)


def unit_costs(cfg: ModelConfig, prompt: int = 512, new: int = 128, ridge: float = 40.0) -> list[float]:
    """Estimated cost of [embedding, layer 0 .. L-1, head] for one request of `prompt` then `new` tokens.

    In FLOP-equivalents: the prompt pass's FLOPs, plus per decode step the larger of its FLOPs and
    `ridge` x the parameters it streams (a decode step reads every weight once; a CPU core reads an fp32
    parameter in about the time of 40 FLOPs). So the head, which sees one position per step but is as
    large as several layers, weighs what it costs in decode.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * 2 * (cfg.num_heads + cfg.num_kv_heads)  # q, k, v, o weights
    shared = 3 * h * cfg.shared_expert_intermediate_size
    active = (3 * h * cfg.expert_inter * cfg.num_experts_per_tok + shared) if cfg.is_moe \
        else 3 * h * cfg.intermediate_size
    stored = 3 * h * cfg.expert_inter * max(1, cfg.num_experts) + h * cfg.num_experts + shared  # + router
    w = min(cfg.sliding_window or prompt + new, prompt)
    prompt_keys = w * (w + 1) / 2 + (prompt - w) * w  # sum over prompt positions p of min(p + 1, window)
    window = cfg.sliding_window or prompt + new
    step_keys = min(prompt + new // 2, window)  # keys a decode step attends to, on average
    attend = 4 * cfg.num_heads * d  # FLOPs per (query, key) pair: q.k and the weighted sum of v
    layer = (2 * (attn + active) * prompt + attend * prompt_keys
             + new * max(2 * (attn + active) + attend * step_keys, ridge * (attn + stored)))
    head = 2 * h * cfg.vocab_size + new * max(2 * h * cfg.vocab_size, ridge * h * cfg.vocab_size)
    embed = h * (prompt + new)  # a gather of one row per token
    return [float(embed)] + [float(layer)] * cfg.num_layers + [float(head)]


def balance(costs: Sequence[float], pp: int) -> list[int]:
    """Layers per stage: contiguous, >= 1 each, minimising the costliest stage (then the sum of squares).

    costs = [embedding, layer 0 .. L-1, head]; the embedding counts on stage 0, the head on the last.
    """
    embed, layers, head = costs[0], list(costs[1:-1]), costs[-1]
    n = len(layers)
    if not 1 <= pp <= n:
        raise ConfigError(f"pp={pp} needs 1..{n} stages for {n} layers.")
    prefix = [0.0]
    for c in layers:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:
        return prefix[j] - prefix[i] + (embed if s == 0 else 0.0) + (head if s == pp - 1 else 0.0)

    # best[s][j]: (max, sum of squares) of stages 0..s covering layers [0, j); cut[s][j]: where stage s starts
    best: list[dict[int, tuple[float, float]]] = [{} for _ in range(pp)]
    cut: list[dict[int, int]] = [{} for _ in range(pp)]
    for j in range(1, n - pp + 2):
        c = cost(0, 0, j)
        best[0][j] = (c, c * c)
    for s in range(1, pp):
        for j in range(s + 1, n - (pp - 1 - s) + 1):
            for i in range(s, j):
                if i not in best[s - 1]:
                    continue
                c = cost(s, i, j)
                m, sq = best[s - 1][i]
                cand = (max(m, c), sq + c * c)
                if j not in best[s] or cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    sizes, j = [], n
    for s in range(pp - 1, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    sizes.append(j)
    return sizes[::-1]


def plan_stages(cfg: ModelConfig, pp: int, spec: PipelineSpec | None = None) -> list[StagePlan]:
    """Every stage's layer range, from --pp-layers (spec.layers), measured costs (spec.costs), or the FLOP estimate."""
    layers, costs = (spec.layers, spec.costs) if spec is not None else (None, None)
    n = cfg.num_layers
    if layers is not None:
        sizes = list(layers)
        if len(sizes) != pp or sum(sizes) != n:
            raise ConfigError(
                f"--pp-layers {','.join(map(str, sizes))} gives {len(sizes)} stages and {sum(sizes)} layers; "
                f"the layout needs {pp} stages (one number per stage) summing to the model's {n} layers."
            )
    else:
        if costs is not None and len(costs) != n + 2:
            raise ConfigError(f"pipeline costs need {n + 2} numbers (embedding, {n} layers, head), "
                              f"got {len(costs)}.")
        sizes = balance(costs or unit_costs(cfg), pp)
    plans, start = [], 0
    for s, size in enumerate(sizes):
        plans.append(StagePlan(s, pp, start, start + size))
        start += size
    return plans


MIN_CHUNK = 128  # tokens: automatic prompt chunking never cuts a chunk shorter


def auto_chunks(n: int, pp: int, micro_batches: int, min_chunk: int) -> int:
    """Chunks per prompt: enough that about 4 x pp pieces of `micro_batches` prompts are in flight, never below
    min_chunk tokens (the engine cuts each prompt on its own: micro_batches=1)."""
    if pp == 1:
        return 1
    want = -(-4 * pp // micro_batches)
    return max(1, min(want, n // min_chunk))
