"""Runs scheduled steps on this rank's model shard over a paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from meshlm.config import ModelConfig
from meshlm.engine.paged_attention import PagedKVCache, StepInput


def local_kv_heads(model: nn.Module, cfg: ModelConfig) -> int:
    """KV heads this rank holds (uneven tensor parallelism gives ranks different counts)."""
    first = next(iter(model.layers.values()))
    return first.self_attn.k_proj.out_features // cfg.head_dim


def kv_bytes_per_block(model: nn.Module, cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes on this rank (K and V, every local layer)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * len(model.layers) * block_size * local_kv_heads(model, cfg) * cfg.head_dim * elem


class ModelRunner:
    """Owns the KV pool of one rank and executes StepInputs."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, dtype: torch.dtype) -> None:
        self.model, self.cfg, self.dtype = model, cfg, dtype
        self.cache: PagedKVCache | None = None

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """Allocate the KV pool (every rank gets the same block count)."""
        self.cache = None
        layer_ids = [int(k) for k in self.model.layers.keys()]
        self.cache = PagedKVCache(layer_ids, num_blocks, block_size, local_kv_heads(self.model, self.cfg),
                                  self.cfg.head_dim, self.dtype, window=self.cfg.sliding_window)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one step; logits [K, V] (fp32) at step.sample_offsets."""
        assert self.cache is not None, "allocate() the KV cache first"
        positions = self.cache.prepare(step)  # [1, T]
        tokens = torch.tensor(step.token_ids, dtype=torch.long).unsqueeze(0)  # [1, T]
        index = torch.tensor(step.sample_offsets, dtype=torch.long).unsqueeze(0)  # [1, K]
        logits = self.model(tokens, positions, self.cache, logits_index=index)  # [1, K, V]
        return logits[0].float()
