"""Building blocks shared by the decoders: RMSNorm, rotary embedding, attention backends."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from meshlm import kernels
from meshlm.config import RopeConfig
from meshlm.kernels import Linear, apply_rope  # noqa: F401  (Linear: the models' linear layer)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in fp32, like the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual, (h, norm(h)) for h = residual + x (the add and the norm in one call)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)  # the reference's ops, fused where it can
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with linear or llama3 scaling."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(is_medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin: [B, S, 1, head_dim] for positions [B, S]."""
    freqs = positions.unsqueeze(-1).float() * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
    return emb.cos().to(dtype).unsqueeze(2), emb.sin().to(dtype).unsqueeze(2)


class AttentionBackend(Protocol):
    """Rotates q and k (RoPE), stores this step's keys/values for a layer, attends over everything cached.

    A backend may also offer `layers_op(h, cos, sin) -> h` for the step (None when not): every layer of the
    model in one call, residual added (the paged cache's whole-stack CPU decode, kernels/decode.py)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
        """q [B, S, Hq*D], k/v [B, S, Hkv*D] (the projections' outputs, which it may overwrite), cos/sin
        [B, S, 1, D] -> out [B, S, Hq*D]."""
        ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         causal: bool = False) -> torch.Tensor:
    """Grouped-query attention; q [B, Hq, S, D], k/v [B, Hkv, T, D] -> [B, Hq, S, D]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def visible_keys(positions: torch.Tensor, kv_len: int, window: int | None = None) -> torch.Tensor:
    """[B, S, T] True where key j < kv_len is visible to a query at position p: j <= p and p - j < window."""
    keys = torch.arange(kv_len, device=positions.device)[None, None, :]  # [1, 1, T]
    p = positions[:, :, None]  # [B, S, 1]
    mask = keys <= p
    if window is not None:
        mask &= keys > p - window
    return mask


class CausalNoCache:
    """Attention over the current tokens only (no cache): a plain causal forward."""

    def __init__(self, pad_mask: torch.Tensor | None = None, window: int | None = None) -> None:
        self.pad_mask = pad_mask  # [B, S] True where a real token sits, or None
        self.window = window  # sliding attention window in tokens, or None for global attention

    def __call__(self, layer: int, q, k, v, cos, sin):
        b, s, d = q.shape[0], q.shape[1], cos.shape[-1]
        q, k, v = q.view(b, s, -1, d), k.view(b, s, -1, d), v.view(b, s, -1, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.pad_mask is None and (self.window is None or s <= self.window):
            out = sdpa(q, k, v, None, causal=True)
        else:
            positions = torch.arange(s, device=q.device)[None]  # [1, S]
            mask = visible_keys(positions, s, self.window)[:, None]  # [1, 1, S, S]
            if self.pad_mask is not None:
                mask = mask & self.pad_mask[:, None, None, :]
            out = sdpa(q, k, v, mask)
        return out.transpose(1, 2).reshape(b, s, -1)
