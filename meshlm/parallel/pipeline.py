"""Pipeline parallelism: module removal, and how a long prompt is cut into chunks that overlap across stages.

Stage s of P owns layers [start, stop) (the split: parallel/partition.py); the embedding lives on stage 0,
the final norm and the head on stage P - 1. A stage deletes every module it does not own (set to None, or
dropped from the ModuleDict of layers) before loading, so it reads only its own weights and the model's
forward never asks which stage it is on.

With P > 1 stages the engine's scheduler cuts a long prompt into chunks of equal estimated cost
(`prompt_chunks`), so chunk k + 1 runs on stage 0 while chunk k runs on stage 1. Stage-to-stage
transfers are Comm.isend / Comm.recv_posted (parallel/comm.py), driven by engine/pipeline_stage.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from meshlm.errors import ConfigError
from meshlm.parallel.partition import (  # noqa: F401 (re-exported)
    MIN_CHUNK,
    StagePlan,
    auto_chunks,
    balance,
    plan_stages,
    unit_costs,
)

if TYPE_CHECKING:
    from meshlm.config import ModelConfig


@dataclass(frozen=True)
class PipelineSpec:
    """How layers are split over stages and how a long prompt is cut into chunks that overlap across them."""

    layers: tuple[int, ...] | None = None  # layers per stage (--pp-layers); None = balanced by cost
    costs: tuple[float, ...] | None = None  # measured seconds of [embedding, layer 0 .. L-1, head]
    prefill_chunks: int | None = None  # chunks per prompt (token-level pipelining); None = auto, 1 = off
    min_chunk: int = MIN_CHUNK  # auto chunking keeps chunks at least this many tokens
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
                  + 3 * h * cfg.expert_inter * (cfg.num_experts_per_tok if cfg.is_moe else 1))
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


def prompt_chunks(cfg: ModelConfig, spec: PipelineSpec, pp: int, start: int, stop: int) -> tuple[int, ...]:
    """Where the chunks of a prefill of positions [start, stop) end, over pp stages (equal estimated cost)."""
    n = spec.prefill_chunks or auto_chunks(stop - start, pp, 1, spec.min_chunk)
    bounds = chunk_bounds(stop, n, attention_ratio(cfg, spec.attention_speed), cfg.sliding_window, start)
    return tuple(b for _, b in bounds)
