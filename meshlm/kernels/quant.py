"""Linear layers and embeddings over packed weights (qformat.py): the AVX-512 kernel in quant.cpp on CPUs
that have it (VNNI for the quantized formats), plain PyTorch (unpack or dequantize, then F.linear)
elsewhere and on CUDA.

For the quantized formats the kernel quantizes each row of x to int8 per block of 32
(d = max|x| / 127, q = round-half-even(x / d)),
as llama.cpp does for its Q8_0/Q4_0/Q4_1 dot products, and sums the int8 x int4/int8 products exactly in
int32 per block; each block's sum is scaled in fp32. A row's result depends only on that row and the
weight (never on the batch around it), for every M: decode, batched decode and prefill take one path.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from meshlm.kernels import qformat
from meshlm.kernels.qformat import QuantInfo

log = logging.getLogger(__name__)


_ops: list = []  # [ops or None] once decided


def _kernel():
    """The loaded ops when the CPU kernel is available (built with the other CPU kernels), else None."""
    if not _ops:
        from meshlm.kernels.gemv import kernel

        _ops.append(kernel())
    return _ops[0]


def _pad(x: torch.Tensor, q: QuantInfo) -> torch.Tensor:
    return F.pad(x, q.pad) if q.pad != (0, 0) else x


def _kernel_ok(x: torch.Tensor, weights: list[torch.Tensor], infos: list[QuantInfo]) -> bool:
    from meshlm.kernels.gemv import vnni

    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and all(w.device.type == "cpu" for w in weights) and _kernel() is not None
            and (vnni() or all(q.fmt in qformat.FLOATS.values() for q in infos)))


def qlinear_many(x: torch.Tensor, weights: list[torch.Tensor],
                 biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """[x @ dequant(w).T + b] for packed weights sharing one input x [..., K] (one kernel call on CPU)."""
    infos = [qformat.info(w) for w in weights]
    shape = x.shape[:-1]
    if _kernel_ok(x, weights, infos) and len({q.pad for q in infos}) == 1:
        xp = _pad(x, infos[0]).reshape(-1, infos[0].k).contiguous()
        outs = _kernel().quant_linear_many(xp, weights, [q.fmt.code for q in infos], [q.n for q in infos],
                                           biases)
        return [o.view(*shape, q.n) for o, q in zip(outs, infos)]
    return [F.linear(_pad(x, q), qformat.dequantize_weight(w).to(x.dtype), b)
            for w, q, b in zip(weights, infos, biases)]


def qlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(weight).T + bias for one packed weight."""
    return qlinear_many(x, [weight], [bias])[0]


def embedding(ids: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` [...] of a packed [V, H] table, dequantized: [..., H] in dtype."""
    return qformat.rows_of(weight, ids.reshape(-1)).to(dtype).view(*ids.shape, -1)
