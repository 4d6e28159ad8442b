"""Runs scheduled steps on this rank's model shard (or pipeline stage) over a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshlm.config import ModelConfig
from meshlm.engine.cp_attention import ContextParallelKVCache
from meshlm.engine.paged_attention import PagedKVCache, StepInput
from meshlm.kernels.fused import argmax
from meshlm.parallel.comm import Comm
from meshlm.parallel.ring import measure_link


@dataclass
class StepOutput:
    """A step's result: every sampled row's argmax, and the whole logits of the rows asked for."""

    best: list[int]  # [K] greedy token of each row of step.sample_offsets
    logits: torch.Tensor  # [len(step.full_rows), V] fp32 on the CPU (the driver samples there), full_rows order


def local_kv_heads(model: nn.Module, cfg: ModelConfig) -> int:
    """KV heads this rank holds (uneven tensor parallelism gives ranks different counts)."""
    first = next(iter(model.layers.values()))
    return first.self_attn.k_proj.out_features // cfg.head_dim


def kv_bytes_per_block(model: nn.Module, cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes on this rank (K and V, every local layer)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * len(model.layers) * block_size * local_kv_heads(model, cfg) * cfg.head_dim * elem


class ModelRunner:
    """Owns the KV pool of one rank (its stage's layers only) and executes StepInputs."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", cp: Comm | None = None, cp_ring: str = "auto") -> None:
        self.model, self.cfg, self.dtype, self.device = model, cfg, dtype, torch.device(device)
        self.cp, self.cp_ring = cp, cp_ring  # context-parallel group (size > 1: the KV sharded over it)
        self.cache: PagedKVCache | None = None
        self.ledger: list[tuple[tuple[str, int, int], ...]] = []  # debug: (request, start, n) of each step run

    def allocate(self, num_blocks: int, block_size: int, announce: bool = False) -> None:
        """Allocate the KV pool (every rank gets the same block count); at cp > 1 measure the ring's link."""
        self.cache = None
        layer_ids = [int(k) for k in self.model.layers.keys()]
        kv_heads = local_kv_heads(self.model, self.cfg)
        if self.cp is None or self.cp.size == 1:
            self.cache = PagedKVCache(layer_ids, num_blocks, block_size, kv_heads, self.cfg.head_dim, self.dtype,
                                      self.device, window=self.cfg.sliding_window)
            layers = [getattr(b, "decode_weights", lambda: None)() for b in self.model.layers.values()]
            self.cache.use_stack(layers, self.cfg.rms_norm_eps)  # CPU decode steps: the whole-stack op
            return
        q_heads = kv_heads * (self.cfg.num_heads // self.cfg.num_kv_heads)
        link = measure_link(self.cp, q_heads, kv_heads, self.cfg.head_dim, self.dtype, self.device)
        self.cache = ContextParallelKVCache(layer_ids, num_blocks, block_size, kv_heads, self.cfg.head_dim,
                                            self.dtype, self.device, self.cfg.sliding_window, self.cp,
                                            self.cp_ring, link, q_heads, announce)

    @torch.inference_mode()
    def forward(self, step: StepInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's layers over the step: logits [K, V] on the last stage, else hidden states [1, T, H].

        hidden: the previous stage's output; None on the first stage, which embeds step.token_ids.
        """
        assert self.cache is not None, "allocate() the KV cache first"
        positions = self.cache.prepare(step)  # [1, T]; at cp > 1 T is this rank's share
        # the positions this stage computed, per request (engine.check_positions compares); cp > 1: rows are local
        if step.seq_ids and (self.cp is None or self.cp.size == 1):
            pos = positions[0].tolist()
            self.ledger.append(tuple((i, pos[s.offset], s.n) for i, s in zip(step.seq_ids, step.seqs)))
        token_ids, sample_offsets = self.cache.rows(step)
        x = torch.tensor([token_ids], dtype=torch.long, device=self.device) \
            if hidden is None else hidden  # [1, T] tokens, or [1, T, H] hidden states
        index = torch.tensor([sample_offsets], dtype=torch.long, device=self.device)  # [1, K]
        out = self.model(x, positions, self.cache, logits_index=index)  # [1, K, V] or [1, T, H]
        return out[0].float() if self.model.lm_head is not None else out

    def execute(self, step: StepInput, hidden: torch.Tensor | None = None) -> StepOutput:
        """Run one step on the last (or only) stage: its argmax tokens and the logits asked for."""
        logits = self.forward(step, hidden)
        if len(logits) != len(step.sample_offsets):  # a cp rank other than 0: it samples nothing
            return StepOutput([], torch.zeros(0, logits.shape[-1]))
        return finish(logits, step)


def finish(logits: torch.Tensor, step: StepInput) -> StepOutput:
    """StepOutput of logits [K, V] (any device): every row's argmax and the rows in step.full_rows, on the CPU."""
    if step.full_rows:
        rows = logits.index_select(0, torch.tensor(step.full_rows, dtype=torch.long, device=logits.device)).cpu()
    else:
        rows = torch.zeros(0, logits.shape[-1])
    return StepOutput(argmax(logits), rows)
