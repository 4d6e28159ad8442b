"""ParallelDims: validate the layout, map ranks to coordinates, build named process groups.

Rank layout (row-major over (dp, pp, cp, tp), tp fastest):

    rank = ((dp_idx * pp + pp_idx) * cp + cp_idx) * tp + tp_idx

so the ranks of one tensor-parallel group are adjacent (same host, fastest links), the context-parallel
ranks of one stage are tp apart, pipeline stages of one replica are cp * tp apart, and data-parallel
replicas are pp * cp * tp apart.

Built: tp, pp, ep and cp. Expert parallelism spans the tensor-parallel ranks of a stage (ep = tp: attention
stays tensor-parallel, each rank holds whole experts; parallel/expert.py), so ep adds no ranks: `ep=N`
alone implies tp=N, and ep with another tp > 1 is refused naming the fix. Context parallelism (cp) splits a
prompt's tokens and the KV cache over cp ranks (parallel/context.py); with pp each stage has its own cp groups
and a cp rank's hidden states go to the same cp index of the next stage (engine/pipeline_stage.py). dp > 1 lays out
independent replicas, which the planner reasons about but one engine does not run: `check_runnable`
refuses it before any rank starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshlm.errors import ConfigError

if TYPE_CHECKING:
    from meshlm.config import ModelConfig


BUILT = ("Built: tensor parallelism (--tp, which also splits every MoE expert), expert parallelism (--ep, whole "
         "experts per tp rank), pipeline parallelism (--pp) and context parallelism (--cp).")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each kind of parallelism; their product (ep excluded: it spans the tp ranks) is the world size."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    world_size: int = field(default=0)

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp", "ep", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {v!r}.")
        if self.ep > 1 and self.tp == 1:
            object.__setattr__(self, "tp", self.ep)  # --ep N alone: the stage's N tp ranks hold the experts
        if self.ep > 1 and self.tp != self.ep:
            raise ConfigError(
                f"ep={self.ep} with tp={self.tp}: expert parallelism spreads the experts over the tensor-parallel "
                f"ranks of each stage, so ep must equal tp. Use --ep {self.ep} alone (it implies --tp {self.ep}), "
                f"or --tp {self.tp} --ep {self.tp}, or --ep 1 to split every expert over the {self.tp} tp ranks."
            )
        product = self.dp * self.pp * self.tp * self.cp
        if self.world_size == 0:
            object.__setattr__(self, "world_size", product)
        if product != self.world_size:
            raise ConfigError(
                f"dp x pp x tp x cp = {self.dp} x {self.pp} x {self.tp} x {self.cp} = {product}, but the "
                f"world size is {self.world_size}. Choose degrees whose product is {self.world_size}, or "
                f"launch {product} processes."
            )

    def check_runnable(self) -> None:
        """Refuse a layout the engine cannot run (dp > 1: one engine drives one replica)."""
        if self.dp != 1:
            raise ConfigError(
                f"data parallelism (dp={self.dp}) is not built into the engine yet; use dp=1 and start one "
                f"server per replica (each with --tp {self.tp} --pp {self.pp}) behind a load balancer. {BUILT}"
            )

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse degrees the model cannot take, naming the fix."""
        if self.tp > cfg.num_heads:
            raise ConfigError(
                f"tp={self.tp} exceeds the model's {cfg.num_heads} attention heads: every tensor-parallel "
                f"rank needs at least one head. Use tp <= {cfg.num_heads} (uneven splits are fine), and "
                "pipeline parallelism (--pp) for more devices."
            )
        if self.ep > 1 and not cfg.is_moe:
            raise ConfigError(f"ep={self.ep} needs a mixture-of-experts model; {cfg.architecture} is dense. Use "
                              f"--tp {self.ep} instead of --ep.")
        if self.ep > cfg.num_experts > 0:
            raise ConfigError(f"ep={self.ep} exceeds the model's {cfg.num_experts} experts: every expert-parallel "
                              f"rank needs at least one. Use --ep <= {cfg.num_experts}.")
        if self.pp > cfg.num_layers:
            raise ConfigError(
                f"pp={self.pp} exceeds the model's {cfg.num_layers} layers; use pp <= {cfg.num_layers}."
            )

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_idx, pp_idx, tp_idx) of a global rank."""
        tp_idx = rank % self.tp
        pp_idx = (rank // (self.tp * self.cp)) % self.pp
        dp_idx = rank // (self.tp * self.cp * self.pp)
        return dp_idx, pp_idx, tp_idx

    def cp_index(self, rank: int) -> int:
        """The context-parallel index of a global rank."""
        return (rank // self.tp) % self.cp

    def rank_of(self, dp_idx: int, pp_idx: int, tp_idx: int, cp_idx: int = 0) -> int:
        """Global rank at the given coordinates."""
        return ((dp_idx * self.pp + pp_idx) * self.cp + cp_idx) * self.tp + tp_idx

    def tp_groups(self) -> list[list[int]]:
        """Ranks of each tensor-parallel group (adjacent ranks)."""
        return [list(range(s, s + self.tp)) for s in range(0, self.world_size, self.tp)]

    def pp_groups(self) -> list[list[int]]:
        """Ranks of each pipeline (one per dp replica, cp index and tp index), in stage order."""
        return [[self.rank_of(d, p, t, c) for p in range(self.pp)]
                for d in range(self.dp) for c in range(self.cp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        """Ranks holding the same shard in different replicas."""
        return [[self.rank_of(d, p, t, c) for d in range(self.dp)]
                for p in range(self.pp) for c in range(self.cp) for t in range(self.tp)]

    def cp_groups(self) -> list[list[int]]:
        """Ranks that split one stage's context (same dp, pp and tp index), in cp order."""
        return [[self.rank_of(d, p, t, c) for c in range(self.cp)]
                for d in range(self.dp) for p in range(self.pp) for t in range(self.tp)]
