"""Pipeline parallelism: balanced contiguous stages, module removal, prompt chunks, stage-to-stage transfers.

Stage s of P owns layers [start, stop); the embedding lives on stage 0, the final norm and the head on
stage P - 1. A stage deletes every module it does not own (set to None, or dropped from the ModuleDict of
layers) before loading, so it reads only its own weights and the model's forward never asks which stage
it is on. Layers are split to minimise the costliest stage under a per-unit cost of a nominal request
(the prompt pass's FLOPs plus, per decode step, the larger of its FLOPs and the time to stream its
parameters: the head, a single position per step but as large as several layers, counts what it costs
in decode), or measured seconds when given. `--pp-layers` overrides the split.

Transfers go point to point inside the pipeline's process group (the pp Comm): a send is posted and
completes in the background (dist.isend), so a stage never waits for its consumer to be ready; receives
block. Comm.send is not used because it returns only once the receiver has taken the message (gloo
rendezvous), which would stall a stage behind the next one and deadlock the token feedback from the last
stage to the first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from meshlm.errors import ConfigError
from meshlm.parallel.comm import Comm
from meshlm.parallel.partition import StagePlan, balance, plan_stages, unit_costs  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from meshlm.config import ModelConfig
    from meshlm.telemetry.trace import Timeline


@dataclass(frozen=True)
class PipelineSpec:
    """How layers are split over stages and how work flows through them."""

    layers: tuple[int, ...] | None = None  # layers per stage (--pp-layers); None = balanced by cost
    costs: tuple[float, ...] | None = None  # measured seconds of [embedding, layer 0 .. L-1, head]
    micro_batches: int | None = None  # None = min(sequences, pp)
    prefill_chunks: int | None = None  # chunks per prompt (token-level pipelining); None = auto, 1 = off
    min_chunk: int = 128  # auto chunking keeps chunks at least this many tokens
    attention_speed: float = 1.0  # chunk rule: attention's FLOP rate / the matmuls' (1.0: count FLOPs alone)
    keep_logits: bool = False  # the last stage keeps each prefill's logits in its report (for checks)
    # What LLM.generate runs at pp > 1: "engine" (continuous batching, one step in flight per stage) or
    # "static" (engine/pipeline_runner.py: whole micro-batches, token-level prefill, traced); serving
    # always runs the engine. micro_batches, prefill_chunks and keep_logits apply to "static".
    schedule: str = "engine"

    def __post_init__(self) -> None:
        if self.schedule not in ("engine", "static"):
            raise ConfigError(f"pipeline schedule must be 'engine' or 'static', got {self.schedule!r}.")
        if self.costs is not None:
            object.__setattr__(self, "costs", tuple(float(c) for c in self.costs))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
            if any(n < 1 for n in self.layers):
                raise ConfigError(f"--pp-layers {list(self.layers)}: every stage needs at least one layer.")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ConfigError(f"micro_batches must be >= 1 (or None for auto), got {self.micro_batches}.")
        if self.prefill_chunks is not None and self.prefill_chunks < 1:
            raise ConfigError(f"prefill_chunks must be >= 1 (1: off, None: auto), got {self.prefill_chunks}.")
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
                  + 3 * h * cfg.intermediate_size * (cfg.num_experts_per_tok if cfg.is_moe else 1))
    return 4 * cfg.num_heads * d / linear / speed


def chunk_bounds(n: int, chunks: int, ratio: float, window: int | None = None) -> list[tuple[int, int]]:
    """Cut positions [0, n) into `chunks` contiguous pieces of equal estimated cost.

    A token at position p costs 1 + ratio * min(p, window) (linear work plus attention over its keys),
    so pieces shrink along the prompt: each stage then spends the same time on every chunk, which is
    the pipeline's tick; equal-sized chunks would make the later ones the slowest and idle the others.
    """
    chunks = max(1, min(chunks, n))
    w = window or n

    def cum(x: float) -> float:  # integral of 1 + ratio * min(p, w) over [0, x]
        return x + ratio * (x * x / 2 if x <= w else w * w / 2 + w * (x - w))

    total, bounds = cum(n), [0]
    for i in range(1, chunks):
        lo, hi = bounds[-1] + 1, n - (chunks - i)  # leave at least one token per remaining chunk
        target = total * i / chunks
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


class StageLink:
    """Point-to-point transfers between the stages of one pipeline (members of the pp Comm), timed."""

    def __init__(self, comm: Comm, timeline: Timeline) -> None:
        self.comm, self.timeline = comm, timeline
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, t: torch.Tensor, dst: int, **args) -> None:
        """Post t for stage dst; it completes in the background (t is kept alive until then)."""
        start = time.perf_counter()
        t = t.contiguous()
        work = dist.isend(t, dst=self.comm.ranks[dst], group=self.comm.group)
        self.pending.append((work, t))
        if len(self.pending) > 64:
            self.pending = [(w, x) for w, x in self.pending if not w.is_completed()]
        nbytes = t.numel() * t.element_size()
        self.comm.stats.record(self.comm.name, "isend", nbytes, time.perf_counter() - start)
        self.timeline.record("send", start, time.perf_counter(), to=dst, bytes=nbytes, **args)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, span: str = "recv",
             **args) -> torch.Tensor:
        """A new tensor received from stage src (blocking); the wait is recorded as `span`."""
        start = time.perf_counter()
        t = torch.empty(shape, dtype=dtype)
        dist.recv(t, src=self.comm.ranks[src], group=self.comm.group)
        nbytes = t.numel() * t.element_size()
        self.comm.stats.record(self.comm.name, "recv", nbytes, time.perf_counter() - start)
        self.timeline.record(span, start, time.perf_counter(), src=src, **args)
        return t

    def flush(self) -> None:
        """Wait for every posted send."""
        if self.pending:
            with self.timeline.span("send", flush=len(self.pending)):
                for work, _ in self.pending:
                    work.wait()
            self.pending.clear()
