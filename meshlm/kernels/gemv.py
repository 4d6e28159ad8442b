"""Decode kernels: an AVX-512 bf16 GEMV and fused norm / RoPE ops, built from source at first use.

Decode at batch 1 multiplies one activation row by every weight matrix. oneDNN runs that product in
bf16 at about half the memory bandwidth (docs/benchmarks.md); the kernel in gemv.cpp streams the weights
at the bandwidth. fp32 stays with F.linear, whose MKL GEMV already does. fused.cpp holds the layer's elementwise chains
(RMSNorm, RoPE) as one call each, for fp32 and bf16 (meshlm/kernels/fused.py). Every op falls back to
the plain PyTorch expression when the extension cannot be built.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.kernels.build import load_extension
from meshlm.kernels.quant import qlinear, qlinear_many

log = logging.getLogger(__name__)

MAX_M = 8  # rows of x (tokens) the kernel takes; prefill and larger batches go to F.linear
_SOURCES = [Path(__file__).with_name(n) for n in ("gemv.cpp", "fused.cpp", "quant.cpp")]
# -ffp-contract=off: a * b + c stays two roundings, as in the reference's separate ops
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-ffp-contract=off"]
_op = None  # torch.ops.meshlm_kernels once loaded
_tried = False


def enabled() -> bool:
    """Whether the kernel is wanted: on unless $MESHLM_KERNELS=0."""
    return os.environ.get("MESHLM_KERNELS", "1") != "0"


def _build():
    """Compile (or reuse from the torch extensions cache) and register the op; None when unavailable."""
    if not enabled():
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16"):
        log.info("meshlm.kernels: no AVX-512 on this CPU; linear layers use F.linear")
        return None
    load_extension("meshlm_gemv_", _SOURCES, _CFLAGS, "decode kernels")
    return torch.ops.meshlm_kernels


def kernel():
    """The loaded ops (torch.ops.meshlm_kernels), building them on the first call; None (logged once)
    when they cannot be had."""
    global _op, _tried
    if not _tried:
        _tried = True
        try:
            _op = _build()
        except Exception as e:  # a missing compiler or headers must not stop generation
            log.warning("meshlm.kernels: decode kernels unavailable (%s); plain PyTorch ops are used",
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            _op = None
    return _op


@functools.cache
def vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (int8 dot products), which the quantized kernel needs."""
    try:
        return " avx512_vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def _gemv_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T is a decode-sized bf16 CPU product the kernel takes."""
    k = x.shape[-1]
    return (
        0 < x.numel() <= MAX_M * k
        and k % 2 == 0
        and weight.dtype is torch.bfloat16
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and weight.dim() == 2
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; bf16 x [..., K] of at most MAX_M rows on the CPU goes through the AVX-512 kernel, and a
    packed quantized weight (uint8, see qformat.py) through the quantized one."""
    if weight.dtype is torch.uint8:
        return qlinear(x, weight, bias)
    if x.dtype is not torch.bfloat16 or (_op is None and _tried):  # fp32, or no kernel: one check
        return F.linear(x, weight, bias)
    if _gemv_ok(x, weight):
        ops = kernel()
        if ops is not None:
            k = x.shape[-1]
            out = ops.small_m_linear(x.reshape(-1, k).contiguous(), weight, bias)  # [M, N]
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear_many(x: torch.Tensor, layers: list[nn.Linear]) -> list[torch.Tensor]:
    """[layer(x) for layer in layers]; decode-sized bf16 products of plain Linear layers in one kernel call
    (x is read and widened once, and one parallel region covers every weight); quantized ones likewise."""
    if all(type(m) is Linear and m.weight.dtype is torch.uint8 for m in layers):
        return qlinear_many(x, [m.weight for m in layers], [m.bias for m in layers])
    if (
        x.dtype is torch.bfloat16
        and not (_op is None and _tried)
        and all(type(m) is Linear for m in layers)
        and all(_gemv_ok(x, m.weight) for m in layers)
    ):
        ops = kernel()
        if ops is not None:
            k = x.shape[-1]
            outs = ops.small_m_linear_many(x.reshape(-1, k).contiguous(), [m.weight for m in layers],
                                           [m.bias for m in layers])
            return [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]
    return [m(x) for m in layers]


class Linear(nn.Linear):
    """nn.Linear whose decode-sized bf16 products run the GEMV kernel (same parameters, fp32 sums)."""

    quantizable = True  # the loader may assign a packed quantized weight (linear() routes it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
