"""Paged attention for mixed batches (prefill chunks and decodes in one step), in plain PyTorch.

The step's tokens are flattened into one row [1, T]. Each layer writes this step's K/V into the pool
slots of its block table, then attends: every decode (one new token) in one batched SDPA over its
gathered context, every prefill chunk in its own SDPA with a causal offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshlm.models.layers import sdpa, visible_keys


@dataclass(frozen=True)
class SeqInput:
    """One sequence's share of a step: tokens[start : start + n] sit at flat offset `offset`."""

    offset: int
    start: int  # position of the first new token (= tokens already cached)
    n: int
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class StepInput:
    """Everything a rank needs to run one step (broadcast from the driver; plain data)."""

    token_ids: tuple[int, ...]  # [T] flattened new tokens of every sequence
    seqs: tuple[SeqInput, ...]
    sample_offsets: tuple[int, ...]  # flat indices whose logits are returned


class PagedKVCache:
    """K/V pools [L_local, num_blocks * block_size, Hkv_local, D] and the per-step attention plan."""

    def __init__(self, layer_ids: list[int], num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", window: int | None = None) -> None:
        shape = (len(layer_ids), num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_of_layer = {lid: i for i, lid in enumerate(layer_ids)}
        self.block_size = block_size
        self.window = window  # sliding attention window (Mistral), None = global

    def _slots(self, table: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def prepare(self, step: StepInput) -> torch.Tensor:
        """Plan attention for a step; returns positions [1, T]."""
        positions, writes, prefills = [], [], []
        dec_idx, dec_slots, dec_len = [], [], []
        for s in step.seqs:
            positions.append(torch.arange(s.start, s.start + s.n))
            writes.append(self._slots(s.block_table, s.start, s.start + s.n))
            ctx = s.start + s.n
            if s.n == 1 and (self.window is None or ctx <= self.window):
                dec_idx.append(s.offset)
                dec_slots.append(self._slots(s.block_table, 0, ctx))
                dec_len.append(ctx)
            else:
                slots = self._slots(s.block_table, 0, ctx)
                mask = None
                if s.start or (self.window is not None and ctx > self.window):
                    mask = visible_keys(torch.arange(s.start, ctx)[None], ctx, self.window)[0]  # [n, ctx]
                prefills.append((s.offset, s.n, slots, mask))
        self.write_slots = torch.cat(writes)
        self.prefills = prefills
        self.dec_idx = torch.tensor(dec_idx, dtype=torch.long)
        if dec_idx:
            longest = max(dec_len)
            self.dec_slots = torch.stack([torch.nn.functional.pad(x, (0, longest - len(x))) for x in dec_slots])
            lens = torch.tensor(dec_len)
            self.dec_mask = None if min(dec_len) == longest else (
                torch.arange(longest)[None, :] < lens[:, None])[:, None, None, :]  # [Bd, 1, 1, Tmax]
        return torch.cat(positions).unsqueeze(0)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, T, Hq, D], k/v [1, T, Hkv, D] -> [1, T, Hq, D]."""
        i = self.slot_of_layer[layer]
        kp, vp = self.k[i], self.v[i]  # [slots, Hkv, D]
        kp[self.write_slots] = k[0]
        vp[self.write_slots] = v[0]
        q0 = q[0]
        out = torch.empty_like(q0)  # [T, Hq, D]
        if len(self.dec_idx):
            qd = q0[self.dec_idx].unsqueeze(2)  # [Bd, Hq, 1, D]
            kd = kp[self.dec_slots].transpose(1, 2)  # [Bd, Hkv, Tmax, D]
            vd = vp[self.dec_slots].transpose(1, 2)
            out[self.dec_idx] = sdpa(qd, kd, vd, self.dec_mask).squeeze(2)
        for offset, n, slots, mask in self.prefills:
            qp = q0[offset:offset + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            kk = kp[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            vv = vp[slots].transpose(0, 1).unsqueeze(0)
            o = sdpa(qp, kk, vv, mask, causal=mask is None)
            out[offset:offset + n] = o[0].transpose(0, 1)
        return out.unsqueeze(0)
