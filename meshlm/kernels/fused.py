"""A decoder layer's elementwise chains as one call each (fused.cpp), with the plain PyTorch expressions
as fallback: RMSNorm (alone and after the residual add), SiLU(gate) * up, RoPE, and RoPE with the
KV-cache write; and the argmax of greedy sampling.

Each rounds where the reference's op-by-op PyTorch rounds, so a bf16 model gives the same values either
way up to the order of a sum (the norm's sum of squares) and the last bit of exp (SiLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshlm.kernels.gemv import kernel

_DTYPES = (torch.float32, torch.bfloat16)


def _fused_ok(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """CPU fp32/bf16 tensors of one dtype, outside autograd, with the extension loaded (the ops make their
    inputs contiguous themselves; one call costs a few attribute reads: it runs several times per layer)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or kernel() is None:
        return False
    for t in others:
        if t.dtype is not x.dtype:
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)))


def argmax(logits: torch.Tensor) -> list[int]:
    """Each row's argmax of logits [K, V] (torch.argmax's first index of the largest value), as a list. One
    kernel call for CPU fp32 rows (torch.argmax takes ~40 us over a 49k vocabulary on this path's CPU);
    torch.argmax elsewhere and for a row that holds a NaN (the op says -1), so its NaN rule applies."""
    k = kernel() if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 else None
    if k is not None and logits.shape[1]:
        best = k.argmax_rows(logits).tolist()
        if -1 not in best:
            return best
    return logits.argmax(-1).tolist()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the normalization in fp32."""
    if x.numel() and _fused_ok(x, weight):
        return kernel().rms_norm(x, weight, eps)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = residual + x: a layer's residual add and the next norm in one call."""
    if x.numel() and _fused_ok(x, residual, weight):  # one shape, checked by the op
        return kernel().add_rms_norm(x, residual, weight, eps)
    h = residual + x
    return h, rms_norm(h, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, each rounded to the dtype as the two ops round."""
    if gate.numel() and _fused_ok(gate, up):  # one shape, checked by the op
        return kernel().silu_mul(gate, up)
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, S, H, D] with cos/sin [B, S, 1, D] (the Hugging Face layout).

    The fused path rotates x in place and returns it; callers pass a tensor they own."""
    b, s, h, d = x.shape
    if x.numel() and cos.shape[:2] == (b, s) and _fused_ok(x, cos, sin) and d <= 1024 and x.is_contiguous() \
            and cos.is_contiguous() and sin.is_contiguous():
        kernel().rope_(x.view(b * s, h, d), cos.view(b * s, d), sin.view(b * s, d))
        return x
    half = d // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [1, T, Hq*D] and k [1, T, Hkv*D], then k and v [1, T, Hkv*D] written to rows `slots` [T] of
    the pools [S, Hkv, D]; returns the rotated q [T, Hq, D] and k [T, Hkv, D] (the fused path rotates the
    callers' q and k in place)."""
    t, d = slots.shape[0], k_pool.shape[-1]
    # the pools (a cache's own contiguous tensors of its dtype) are checked by the op
    if t and d <= 1024 and _fused_ok(q, k, v, cos, sin) and q.is_contiguous() and k.is_contiguous():
        kernel().rope_store_(q, k, v, cos, sin, k_pool, v_pool, slots)
        return q.view(t, -1, d), k.view(t, -1, d)
    q = apply_rope(q.view(1, t, -1, d), cos, sin)[0]
    k = apply_rope(k.view(1, t, -1, d), cos, sin)[0]
    k_pool.index_copy_(0, slots, k)
    v_pool.index_copy_(0, slots, v.view(t, -1, d))
    return q, k
