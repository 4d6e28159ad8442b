"""The engine's settings (EngineConfig) and the figures it reports between steps (EngineStats)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshlm.engine.scheduler import SchedulerConfig
from meshlm.engine.spec_policy import SpecCounters
from meshlm.engine.speculative import SpeculativeConfig
from meshlm.errors import ConfigError
from meshlm.parallel.eplb import ExpertFigures


@dataclass(frozen=True)
class EngineConfig:
    """KV cache and scheduling settings."""

    block_size: int = 16
    kv_cache_mb: float | None = None  # per rank; None = kv_cache_fraction of available memory
    kv_cache_fraction: float = 0.25
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Steps in flight at pp > 1 (None: one per stage). Stages that share one host's memory bandwidth can
    # do better with 1 (docs/benchmarks.md); stages on separate devices or hosts want pp.
    pipeline_depth: int | None = None
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}.")
        if self.kv_cache_mb is not None and self.kv_cache_mb <= 0:
            raise ConfigError(f"--kv-cache-mb must be positive, got {self.kv_cache_mb}.")
        if self.pipeline_depth is not None and self.pipeline_depth < 1:
            raise ConfigError(f"pipeline_depth must be >= 1 (or None: one step per stage), got {self.pipeline_depth}.")
        if not 0 < self.kv_cache_fraction <= 0.9:
            raise ConfigError(f"kv_cache_fraction must be in (0, 0.9], got {self.kv_cache_fraction}.")


@dataclass(frozen=True)
class EngineStats:
    """The engine's figures between steps: queues, KV use, token totals, rank 0's collective and pipeline time."""

    running: int = 0
    waiting: int = 0
    max_waiting: int = 0  # queued requests before add_request raises QueueFull
    kv_usage: float = 0.0  # fraction of KV blocks held by live requests
    num_preemptions: int = 0
    prompt_tokens: int = 0  # admitted since start
    generation_tokens: int = 0
    collective_seconds: Mapping[str, float] = field(default_factory=dict)  # "group/op" -> seconds (rank 0)
    bubble_fraction: float = 0.0  # pp > 1: stage 0's share of pipelined time waiting for the later stages
    speculative: SpecCounters | None = None  # proposed / accepted tokens (a copy), None without speculation
    expert_tokens_dropped: int = 0  # ep > 1 with --expert-capacity: routed rows past an expert's capacity
    cp_ring_choices: Mapping[str, int] = field(default_factory=dict)  # cp > 1: prefills by ring (pass-kv, pass-q)
    experts: ExpertFigures | None = None  # ep > 1: balance, load, link bytes (rank 0's stage); --expert-budget hits
