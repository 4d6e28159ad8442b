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

log = logging.getLogger(__name__)


_ops: list = []  # [ops or None] once decided


def _kernel():
    """The loaded ops when the CPU kernel is available (built with the other CPU kernels), else None."""
    if not _ops:
        from meshlm.kernels.gemv import kernel

        _ops.append(kernel())
    return _ops[0]


_XDTYPES = (torch.float32, torch.bfloat16)


def call_args(weights: list[torch.Tensor]) -> tuple | None:
    """(format codes, row counts, input pad) for one kernel call over these packed weights, or None when
    the kernel cannot take them (not built, off the CPU, a quantized format without VNNI, mixed pads)."""
    from meshlm.kernels.gemv import vnni

    infos = [qformat.info(w) for w in weights]
    if (_kernel() is None or any(w.device.type != "cpu" for w in weights) or len({q.pad for q in infos}) != 1
            or not (vnni() or all(q.fmt in qformat.FLOATS.values() for q in infos))):
        return None
    return [q.fmt.code for q in infos], [q.n for q in infos], infos[0].pad


def qlinear_many(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                 args: tuple | None | bool = False) -> list[torch.Tensor]:
    """[x @ dequant(w).T + b] for packed weights sharing one input x [..., K] (one kernel call on CPU);
    args: call_args(weights) when the caller keeps them (False: work them out here)."""
    if args is False:
        args = call_args(weights)
    if args is not None and x.dtype in _XDTYPES and x.device.type == "cpu":
        codes, ns, pad = args
        return _kernel().quant_linear_many(F.pad(x, pad) if pad != (0, 0) else x, weights, codes, ns, biases)
    out = []
    for w, b in zip(weights, biases):
        q = qformat.info(w)
        xp = F.pad(x, q.pad) if q.pad != (0, 0) else x
        out.append(F.linear(xp, qformat.dequantize_weight(w).to(x.dtype), b))
    return out


def qlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(weight).T + bias for one packed weight (its call arguments worked out once, kept on it:
    o_proj, down_proj and the head come here every decode step)."""
    args = weight.__dict__.get("_call_args", False)
    if args is False:
        args = weight.__dict__["_call_args"] = call_args([weight])
    return qlinear_many(x, [weight], [bias], args)[0]


def embedding(ids: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` [...] of a packed [V, H] table, dequantized: [..., H] in dtype (one kernel call on CPU)."""
    k = _kernel() if weight.device.type == "cpu" else None
    flat = ids.reshape(-1)
    rows = qformat.rows_of(weight, flat) if k is None else k.packed_rows(weight, qformat.info(weight).fmt.code, flat)
    return rows.to(dtype).view(*ids.shape, -1)
