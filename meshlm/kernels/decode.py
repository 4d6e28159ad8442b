"""A whole decode step of a stage's layers in one C++ call (decode.cpp), for CPU decode steps.

At batch-1 decode a layer's products stream a few hundred kB each, and the per-op path spent about as
much again in ~15 torch calls per layer and one OpenMP region per product. The stack op runs every layer
of the stage for M decode rows in one call and one parallel region, with the per-op path's arithmetic
(so a row's values are the same bits either way). A stage qualifies when every layer is a plain
Llama-family block (norms, attention and SwiGLU MLP of kernels.Linear layers with packed weights, no
tensor-parallel shard: tp > 1 keeps the per-op path, whose all-reduces sit between the products), the
KV pools are fp32/bf16 on the CPU, and the kernels are built; prefill and mixed steps take the per-op path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshlm.kernels import qformat
from meshlm.kernels.gemv import Linear, kernel
from meshlm.kernels.quant import call_args


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's parameters, as the stack op takes them."""

    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    linears: tuple[nn.Module, ...]  # q, k, v, o, gate, up, down (kernels.Linear)


class DecodeStack:
    """The stack op bound to a stage's layers and KV pools (made once, when the cache is allocated)."""

    def __init__(self, layers: list[LayerWeights], k_pool: torch.Tensor, v_pool: torch.Tensor, head_dim: int,
                 block_size: int, eps: float, scale: float) -> None:
        first = layers[0].linears
        hq, hkv = first[0].out_features // head_dim, first[1].out_features // head_dim
        meta = [len(layers), first[0].in_features, first[4].out_features, hq, hkv, head_dim, block_size]
        tensors = []
        for lw in layers:
            ws = [m.weight for m in lw.linears]
            tensors += [lw.input_norm, lw.post_norm, *ws]
            tensors += [m.bias.detach() if m.bias is not None else torch.empty(0) for m in lw.linears]
            meta += [qformat.info(w).fmt.code for w in ws]
        self.op = torch.classes.meshlm_kernels.DecodeStack([t.detach() for t in tensors] + [k_pool, v_pool], meta,
                                                           eps, scale)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """x [1, M, H] (M decode rows), cos/sin [1, M, 1, D] -> the stage's output [1, M, H] (residual added)."""
        return self.op.run(x.reshape(x.shape[1], -1), cos.reshape(cos.shape[1], -1), sin.reshape(sin.shape[1], -1),
                           slots, tables, starts, lens).view(x.shape)


def decode_stack(layers: list[LayerWeights | None], k_pool: torch.Tensor, v_pool: torch.Tensor, head_dim: int,
                 block_size: int, eps: float, scale: float) -> DecodeStack | None:
    """The stack op for these layers and pools [L, S, Hkv, D], or None where it does not apply (a layer
    that is not a plain block, a weight the kernel cannot take, CUDA, a dtype other than fp32/bf16, no
    kernels)."""
    if not layers or any(lw is None for lw in layers) or kernel() is None or k_pool.device.type != "cpu" \
            or k_pool.dtype not in (torch.float32, torch.bfloat16):
        return None
    for lw in layers:
        if any(type(m) is not Linear or qformat.info(m.weight) is None for m in lw.linears):
            return None
        if call_args([m.weight for m in lw.linears]) is None or qformat.info(lw.linears[0].weight).pad != (0, 0):
            return None  # a format the kernel cannot take here, or a tensor-parallel shard's padded input
        if lw.input_norm.dtype != k_pool.dtype or lw.post_norm.dtype != k_pool.dtype:
            return None
    return DecodeStack(layers, k_pool, v_pool, head_dim, block_size, eps, scale)
