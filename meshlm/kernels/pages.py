"""Packed weights moved into one buffer on 2 MB pages (Linux transparent huge pages), in forward order.

A batch-1 decode step streams every weight once. From 4 KB pages each page costs a TLB miss, and under a
hypervisor's nested paging its walk is slow: on the benchmark host (AMD EPYC, KVM) one core reads 19-21
GB/s from 4 KB pages and 33-34 GB/s from 2 MB pages (torch.sum over 128 MB), and the kernels stream
SmolLM2's layer products 1.15-1.9x faster from one 2 MB-page buffer than from separate allocations
(benchmarks/gemm.py --ceiling). The buffer is advised MADV_HUGEPAGE before its first touch, which is all
Linux's default THP mode ("madvise") asks; where the advice fails the weights stay where they were.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _advise(t: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) over t's bytes (2 MB-aligned); False where it does not apply."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.numel()), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def huge_buffer(nbytes: int) -> torch.Tensor | None:
    """An untouched uint8 buffer of nbytes (rounded up to 2 MB), 2 MB-aligned and advised MADV_HUGEPAGE, so
    its first touch maps 2 MB pages; None where the advice fails."""
    total = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    buf = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)  # untouched until the caller writes it
    start = (-buf.data_ptr()) % HUGE_PAGE
    arena = buf[start:start + total]
    return arena if total and _advise(arena) else None


def to_huge_pages(params: list[nn.Parameter]) -> int:
    """Move these CPU parameters' data, in this order, into one huge_buffer (each keeps its object, dtype
    and shape: .data becomes a view into the buffer, 64-byte aligned); returns the buffer's bytes, 0 where
    nothing moved."""
    params = [p for p in params if p.device.type == "cpu" and p.is_contiguous()]
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in params]
    arena = huge_buffer(sum(sizes))
    if arena is None:
        return 0
    offset = 0
    for p, size in zip(params, sizes):
        view = arena[offset:offset + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view  # the old storage is freed here (the parameter object, and its attributes, stay)
        offset += size
    log.info("meshlm.kernels: %d packed weights (%.0f MB) moved onto 2 MB pages", len(params), arena.numel() / 1e6)
    return arena.numel()
