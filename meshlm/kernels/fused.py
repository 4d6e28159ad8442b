"""RMSNorm and RoPE as one call each (fused.cpp), with the plain PyTorch expressions as fallback.

Both round where the reference's op-by-op PyTorch rounds, so a bf16 model gives the same values either
way up to the order of a sum; fp32 differs from the fallback by float rounding of the norm's sum only.
"""

from __future__ import annotations

import torch

from meshlm.kernels.gemv import kernel


def _fused_ok(*tensors: torch.Tensor) -> bool:
    """CPU fp32/bf16 contiguous tensors of one dtype, outside autograd, with the extension loaded."""
    x = tensors[0]
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and all(t.dtype is x.dtype and t.is_contiguous() for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and kernel() is not None
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the normalization in fp32."""
    if x.numel() and _fused_ok(x, weight):
        return kernel().rms_norm(x, weight, eps)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, S, H, D] with cos/sin [B, S, 1, D] (the Hugging Face layout).

    The fused path rotates x in place and returns it; callers pass a tensor they own."""
    b, s, h, d = x.shape
    if x.numel() and cos.shape[:2] == (b, s) and _fused_ok(x, cos, sin) and d <= 1024:
        kernel().rope_(x.view(b * s, h, d), cos.view(b * s, d), sin.view(b * s, d))
        return x
    half = d // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
