"""Sharding styles: which slice of each tensor a rank reads (shard) and what collective follows (apply).

One source of truth for both: `apply_plan` swaps each planned module to its parallel class and returns
the loader's `part_for` callback, so the slices read at load time are the ones the forward expects.

Attention is split by whole KV groups, unevenly when needed (9 heads / 3 KV heads at tp=2 gives 6 + 3
query heads). When tp exceeds the KV head count, each rank holds one KV head (replicated across the
ranks that share it) and a share of that group's query heads. The MLP splits its intermediate size
evenly on its own. MoE experts either split each expert's intermediate size the same way (ep = 1, an
all-reduce after) or, at ep = tp, each rank holds whole experts (expert.py: all-to-all dispatch and combine).
OLMoE's q/k norms span all heads: each rank normalizes its heads with the sum of squares all-reduced.
The vocabulary splits evenly; the head's logits are all-gathered so every rank samples from the same full
distribution (simple and exact; costs V x 4 bytes per token).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from meshlm.checkpoint.source import ExpertPick, Slice
from meshlm.config import ModelConfig
from meshlm.kernels.gemv import Embedding, Linear, embed, linear
from meshlm.models.layers import RMSNorm
from meshlm.models.mixtral import Experts
from meshlm.parallel.comm import Comm
from meshlm.parallel.expert import ExpertLoad, Placement, make_expert_parallel
from meshlm.parallel.partition import HeadShard, even_partition, head_partition  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class ShardLayout:
    """Everything rank `index` of a tp group owns."""

    index: int
    size: int
    heads: list[HeadShard]
    inter: list[tuple[int, int]]
    vocab: list[tuple[int, int]]

    @classmethod
    def for_model(cls, cfg: ModelConfig, index: int, size: int) -> ShardLayout:
        """The layout of every rank for cfg at tp=size."""
        return cls(index, size, head_partition(cfg.num_heads, cfg.num_kv_heads, size),
                   even_partition(cfg.intermediate_size, size), even_partition(cfg.vocab_size, size))

    @property
    def mine(self) -> HeadShard:
        """This rank's heads."""
        return self.heads[self.index]


class RowParallelLinear(Linear):
    """y = all_reduce(x_shard @ W_shard^T); the bias is added once (rank 0). A packed quantized shard holds
    the whole 32-blocks over its columns and pads x with zeros where the range cuts a block (exact)."""

    comm: Comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.comm.index == 0 else None
        return self.comm.all_reduce(linear(x, self.weight, bias))  # decode-sized bf16: the GEMV kernel


class VocabParallelEmbedding(Embedding):
    """Rows [vocab_start, vocab_start + n) of the table; others contribute zeros; summed over ranks."""

    comm: Comm
    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)  # this rank's rows (the loader sets it)
        out = embed(local.masked_fill(outside, 0), self.weight, self.out_dtype)  # [B, S, H]
        return self.comm.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


class VocabParallelHead(Linear):
    """Local logits for this rank's vocabulary rows, all-gathered into the full [.., V] logits."""

    comm: Comm
    sizes: list[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(linear(x, self.weight), dim=-1, sizes=self.sizes)


class TensorParallelExperts(Experts):
    """Each expert's intermediate dimension is split; partial outputs are summed over ranks."""

    comm: Comm

    def forward(self, x, expert_ids, weights):
        return self.comm.all_reduce(super().forward(x, expert_ids, weights))


class HeadsParallelRMSNorm(RMSNorm):
    """RMSNorm over a projection split by heads: the sum of squares of this rank's part (scaled by `share`,
    1 / the ranks holding the same replicated heads) is all-reduced; full_dim is the whole projection's size."""

    comm: Comm
    full_dim: int
    share: float

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        xf = x.float()
        ss = self.comm.all_reduce(xf.pow(2).sum(-1, keepdim=True) * self.share)  # [.., 1]
        return self.weight * (xf * torch.rsqrt(ss / self.full_dim + self.eps)).to(x.dtype)


def _slices(style: str, layout: ShardLayout, cfg: ModelConfig) -> dict[str, Slice | ExpertPick | None]:
    """Per-parameter slice (in checkpoint coordinates) for a style."""
    h, head_dim = layout.mine, cfg.head_dim
    i0, i1 = layout.inter[layout.index]
    e0, e1 = even_partition(cfg.expert_inter, layout.size)[layout.index]
    s0, s1 = even_partition(max(1, cfg.shared_expert_intermediate_size), layout.size)[layout.index]
    v0, v1 = layout.vocab[layout.index]
    q = (h.q_start * head_dim, h.q_end * head_dim)
    kv = (h.kv_start * head_dim, h.kv_end * head_dim)
    table = {
        "heads_colwise": {"weight": Slice(0, *q), "bias": Slice(0, *q)},
        "kv_heads_colwise": {"weight": Slice(0, *kv), "bias": Slice(0, *kv)},
        "heads_rowwise": {"weight": Slice(1, *q), "bias": None},
        "colwise": {"weight": Slice(0, i0, i1), "bias": Slice(0, i0, i1)},
        "rowwise": {"weight": Slice(1, i0, i1), "bias": None},
        "vocab_embedding": {"weight": Slice(0, v0, v1)},
        "vocab_head": {"weight": Slice(0, v0, v1)},
        "shared_colwise": {"weight": Slice(0, s0, s1)},
        "shared_rowwise": {"weight": Slice(1, s0, s1)},
        "heads_norm": {"weight": Slice(0, *q)},
        "kv_heads_norm": {"weight": Slice(0, *kv)},
        "replicate": {},
        # stacked experts are read per expert from [I, H] (w1, w3) and [H, I] (w2) tensors
        "expert": {"w1": Slice(0, e0, e1), "w3": Slice(0, e0, e1), "w2": Slice(1, e0, e1)},
    }
    if style not in table:
        raise ValueError(f"unknown sharding style {style!r}")
    return table[style]


def _swap(module: nn.Module, style: str, layout: ShardLayout, comm: Comm, cfg: ModelConfig) -> None:
    cls = {"heads_rowwise": RowParallelLinear, "rowwise": RowParallelLinear, "shared_rowwise": RowParallelLinear,
           "vocab_embedding": VocabParallelEmbedding, "vocab_head": VocabParallelHead,
           "expert": TensorParallelExperts, "heads_norm": HeadsParallelRMSNorm,
           "kv_heads_norm": HeadsParallelRMSNorm}.get(style)
    if cls is None:
        return
    module.__class__ = cls
    module.comm = comm
    if style == "vocab_embedding":
        module.vocab_start = layout.vocab[layout.index][0]
    if style == "vocab_head":
        module.sizes = [b - a for a, b in layout.vocab]
    if style in ("heads_norm", "kv_heads_norm"):
        kv = style == "kv_heads_norm"
        module.full_dim = (cfg.num_kv_heads if kv else cfg.num_heads) * cfg.head_dim
        mine = (layout.mine.kv_start, layout.mine.kv_end)
        module.share = 1.0 / sum((h.kv_start, h.kv_end) == mine for h in layout.heads) if kv else 1.0


def apply_plan(model: nn.Module, plan: dict[str, str], cfg: ModelConfig, comm: Comm, ep: int = 1,
               capacity_factor: float | None = None, load: ExpertLoad | None = None):
    """Swap planned modules to their parallel classes; return part_for(param_name, shape) for loading.

    ep == comm.size > 1: each rank holds whole experts (Placement.contiguous) behind all-to-all (expert.py),
    counting its routing decisions into `load`."""
    layout = ShardLayout.for_model(cfg, comm.index, comm.size)
    parts: dict[str, Slice | ExpertPick | None] = {}
    if comm.size == 1:
        return lambda name, shape: None
    placement = Placement.contiguous(cfg.num_experts, ep) if ep > 1 else None
    for mod_name, module in model.named_modules():
        style = next((s for pat, s in plan.items() if fnmatch.fnmatchcase(mod_name, pat)), None)
        if style is None:
            continue
        if style == "expert" and placement is not None:
            pick = ExpertPick(placement.slots[comm.index])
            parts.update({f"{mod_name}.{w}": pick for w in ("w1", "w2", "w3")})
            make_expert_parallel(module, comm, placement, int(mod_name.split(".")[1]),
                                 load if load is not None else ExpertLoad(), capacity_factor)
            continue
        for attr, sl in _slices(style, layout, cfg).items():
            parts[f"{mod_name}.{attr}"] = sl
        _swap(module, style, layout, comm, cfg)
    return lambda name, shape: parts.get(name)
