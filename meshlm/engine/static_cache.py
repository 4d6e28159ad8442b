"""A preallocated per-sequence KV cache: the attention backend for offline generation."""

from __future__ import annotations

import torch

from meshlm.models.layers import sdpa, visible_keys


class StaticKVCache:
    """k/v [L, B, T, Hkv, D] preallocated; each step writes at its positions and attends causally.

    Call `prepare(positions)` before each forward. Sequences may sit at different positions:
    key j is visible to a query at position p iff j <= p (and p - j < window with a sliding window),
    so stale slots past a sequence's end (right padding of a ragged prefill) are overwritten before
    any query can see them.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", window: int | None = None) -> None:
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.window = window
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._start: int | None = None  # every row writes positions start .. start + S - 1
        self._kv_len = 0
        self._mask: torch.Tensor | None = None
        self._causal = False

    def prepare(self, positions: torch.Tensor, kv_len: int | None = None) -> None:
        """positions [B, S] of this step's tokens; kv_len = 1 + the largest position."""
        b, s = positions.shape
        kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
        self._rows = torch.arange(b, device=positions.device)[:, None].expand(b, s)
        self._pos = positions
        self._kv_len = kv_len
        start = positions[:, :1]
        contiguous = bool((positions == start + torch.arange(s, device=positions.device)).all())
        shared = contiguous and bool((start == start[0]).all())
        self._start = int(start[0, 0]) if shared else None  # then a slice copy replaces index_put
        aligned = contiguous and bool((positions[:, -1] == kv_len - 1).all())
        aligned = aligned and (self.window is None or kv_len <= self.window)  # else the window must mask
        if aligned and s == 1:
            self._mask, self._causal = None, False  # every cached key is visible
        elif aligned and s == kv_len:
            self._mask, self._causal = None, True  # a fresh prefill of equal lengths
        else:
            self._mask = visible_keys(positions, kv_len, self.window).unsqueeze(1)  # [B, 1, S, T]
            self._causal = False

    def __call__(self, layer: int, q, k, v):
        if self._start is not None:
            self.k[layer, :, self._start: self._start + k.shape[1]] = k  # k: [B, S, Hkv, D]
            self.v[layer, :, self._start: self._start + k.shape[1]] = v
        else:
            self.k[layer][self._rows, self._pos] = k
            self.v[layer][self._rows, self._pos] = v
        keys = self.k[layer, :, : self._kv_len].transpose(1, 2)  # [B, Hkv, T, D]
        vals = self.v[layer, :, : self._kv_len].transpose(1, 2)
        out = sdpa(q.transpose(1, 2), keys, vals, self._mask, causal=self._causal)
        return out.transpose(1, 2)  # [B, S, Hq, D]
