"""Small-M bf16 linear: an AVX-512 GEMV extension built from source at first use, else F.linear.

Decode at batch 1 multiplies one activation row by every weight matrix. oneDNN runs that product in
bf16 at about half the memory bandwidth (docs/benchmarks.md); the kernel in gemv.cpp streams the weights
at the bandwidth. fp32 stays with F.linear, whose MKL GEMV already does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_M = 8  # rows of x (tokens) the kernel takes; prefill and larger batches go to F.linear
_SOURCE = Path(__file__).with_name("gemv.cpp")
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp"]
_op = None  # torch.ops.meshlm_kernels.small_m_linear once loaded
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
    from torch.utils.cpp_extension import _get_build_directory, load

    text = _SOURCE.read_bytes() + " ".join(_CFLAGS).encode() + torch.__version__.encode()
    name = "meshlm_gemv_" + hashlib.sha1(text).hexdigest()[:10]  # a new source or torch builds anew
    build_dir = _get_build_directory(name, verbose=False)
    cached = (Path(build_dir) / f"{name}.so").exists()
    if not cached:
        log.warning("meshlm.kernels: compiling the AVX-512 GEMV kernel (once, ~15 s) into %s", build_dir)
    t0 = time.perf_counter()
    load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS, is_python_module=False, verbose=False)
    log.info("meshlm.kernels: GEMV kernel %s in %.1f s", "loaded" if cached else "built",
             time.perf_counter() - t0)
    return torch.ops.meshlm_kernels.small_m_linear


def kernel():
    """The loaded op, building it on the first call; None (logged once) when it cannot be had."""
    global _op, _tried
    if not _tried:
        _tried = True
        try:
            _op = _build()
        except Exception as e:  # a missing compiler or headers must not stop generation
            log.warning("meshlm.kernels: GEMV kernel unavailable (%s); linear layers use F.linear",
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            _op = None
    return _op


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; bf16 x [..., K] of at most MAX_M rows on the CPU goes through the AVX-512 kernel."""
    if x.dtype is not torch.bfloat16 or (_op is None and _tried):  # fp32, or no kernel: one check
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    if (
        0 < x.numel() <= MAX_M * k
        and k % 2 == 0
        and weight.dtype is torch.bfloat16
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and weight.dim() == 2
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        op = kernel()
        if op is not None:
            out = op(x.reshape(-1, k).contiguous(), weight, bias)  # [M, N]
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
