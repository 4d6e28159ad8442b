"""Pipeline parallelism: balanced contiguous stages, module removal, and how a long prompt is cut into chunks.

Stage s of P owns layers [start, stop); the embedding lives on stage 0, the final norm and the head on
stage P - 1. A stage deletes every module it does not own (set to None, or dropped from the ModuleDict of
layers) before loading, so it reads only its own weights and the model's forward never asks which stage
it is on. Layers are split to minimise the costliest stage under a per-unit cost of a nominal request
(the prompt pass's FLOPs plus, per decode step, the larger of its FLOPs and the time to stream its
parameters: the head, a single position per step but as large as several layers, counts what it costs
in decode), or measured seconds when given. `--pp-layers` overrides the split.

With P > 1 stages the engine's scheduler cuts a long prompt into chunks of equal estimated cost
(`prompt_chunks`), so chunk k + 1 runs on stage 0 while chunk k runs on stage 1. Stage-to-stage
transfers are Comm.isend / Comm.recv_posted (parallel/comm.py), driven by engine/pipeline_stage.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from meshlm.errors import ConfigError

if TYPE_CHECKING:
    from meshlm.config import ModelConfig


@dataclass(frozen=True)
class PipelineSpec:
    """How layers are split over stages and how a long prompt is cut into chunks that overlap across them."""

    layers: tuple[int, ...] | None = None  # layers per stage (--pp-layers); None = balanced by cost
    costs: tuple[float, ...] | None = None  # measured seconds of [embedding, layer 0 .. L-1, head]
    prefill_chunks: int | None = None  # chunks per prompt (token-level pipelining); None = auto, 1 = off
    min_chunk: int = 128  # auto chunking keeps chunks at least this many tokens
    attention_speed: float = 1.0  # chunk rule: attention's FLOP rate / the matmuls' (1.0: count FLOPs alone)

    def __post_init__(self) -> None:
        if self.costs is not None:
            object.__setattr__(self, "costs", tuple(float(c) for c in self.costs))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
            if any(n < 1 for n in self.layers):
                raise ConfigError(f"--pp-layers {list(self.layers)}: every stage needs at least one layer.")
        if self.prefill_chunks is not None and self.prefill_chunks < 1:
            raise ConfigError(f"--prefill-chunks must be >= 1 (1: off, unset: auto), got {self.prefill_chunks}.")
        if self.attention_speed <= 0:
            raise ConfigError(f"attention_speed must be > 0 (1.0: count FLOPs alone), got {self.attention_speed}.")
        if self.min_chunk < 1:
            raise ConfigError(f"min_chunk must be >= 1, got {self.min_chunk}.")


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
    active = 3 * h * cfg.intermediate_size * (cfg.num_experts_per_tok if cfg.is_moe else 1)
    stored = 3 * h * cfg.intermediate_size * max(1, cfg.num_experts) + h * cfg.num_experts  # + router
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
    """Every stage's layer range, from --pp-layers, measured costs, or the FLOP estimate."""
    spec = spec or PipelineSpec()
    n = cfg.num_layers
    if spec.layers is not None:
        sizes = list(spec.layers)
        if len(sizes) != pp or sum(sizes) != n:
            raise ConfigError(
                f"--pp-layers {','.join(map(str, sizes))} gives {len(sizes)} stages and {sum(sizes)} layers; "
                f"the layout needs {pp} stages (one number per stage) summing to the model's {n} layers."
            )
    else:
        if spec.costs is not None and len(spec.costs) != n + 2:
            raise ConfigError(f"pipeline costs need {n + 2} numbers (embedding, {n} layers, head), "
                              f"got {len(spec.costs)}.")
        sizes = balance(spec.costs or unit_costs(cfg), pp)
    plans, start = [], 0
    for s, size in enumerate(sizes):
        plans.append(StagePlan(s, pp, start, start + size))
        start += size
    return plans


def split_model(model: nn.Module, plan: StagePlan) -> nn.Module:
    """Delete what `plan`'s stage does not own: other layers, the embedding (off stage 0), norm and head."""
    for key in list(model.layers.keys()):
        if int(key) not in plan.layers:
            del model.layers[key]
    if not plan.first:
        model.embed_tokens = None
    if not plan.last:
        model.norm = None
        model.lm_head = None
    return model


def attention_ratio(cfg: ModelConfig, speed: float = 1.0) -> float:
    """Cost of one (query, key) pair over the linear cost of one token, in one layer: their FLOPs, the pair's
    divided by `speed`, the attention kernels' FLOP rate over the matmuls' (CPU SDPA runs at about a third)."""
    h, d = cfg.hidden_size, cfg.head_dim
    linear = 2 * (h * d * 2 * (cfg.num_heads + cfg.num_kv_heads)
                  + 3 * h * cfg.intermediate_size * (cfg.num_experts_per_tok if cfg.is_moe else 1))
    return 4 * cfg.num_heads * d / linear / speed


def chunk_bounds(n: int, chunks: int, ratio: float, window: int | None = None,
                 start: int = 0) -> list[tuple[int, int]]:
    """Cut positions [start, n) into `chunks` contiguous pieces of equal estimated cost.

    A token at position p costs 1 + ratio * min(p, window) (linear work plus attention over its keys),
    so pieces shrink along the prompt: each stage then spends the same time on every chunk, which is
    the pipeline's tick; equal-sized chunks would make the later ones the slowest and idle the others.
    """
    chunks = max(1, min(chunks, n - start))
    w = window or n

    def cum(x: float) -> float:  # integral of 1 + ratio * min(p, w) over [0, x]
        return x + ratio * (x * x / 2 if x <= w else w * w / 2 + w * (x - w))

    base, bounds = cum(start), [start]
    total = cum(n) - base
    for i in range(1, chunks):
        lo, hi = bounds[-1] + 1, n - (chunks - i)  # leave at least one token per remaining chunk
        target = base + total * i / chunks
        while lo < hi:  # smallest b with cum(b) >= target
            mid = (lo + hi) // 2
            if cum(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        bounds.append(lo)
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:]))


def auto_chunks(n: int, pp: int, micro_batches: int, min_chunk: int) -> int:
    """Chunks per prompt: enough that about 4 x pp pieces are in flight, never below min_chunk tokens."""
    if pp == 1:
        return 1
    want = -(-4 * pp // micro_batches)
    return max(1, min(want, n // min_chunk))


def prompt_chunks(cfg: ModelConfig, spec: PipelineSpec, pp: int, start: int, stop: int) -> tuple[int, ...]:
    """Where the chunks of a prefill of positions [start, stop) end, over pp stages (equal estimated cost)."""
    n = spec.prefill_chunks or auto_chunks(stop - start, pp, 1, spec.min_chunk)
    bounds = chunk_bounds(stop, n, attention_ratio(cfg, spec.attention_speed), cfg.sliding_window, start)
    return tuple(b for _, b in bounds)
