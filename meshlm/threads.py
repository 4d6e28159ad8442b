"""Per-process CPU settings: the intra-op thread count, and glibc malloc's reuse of freed memory."""

from __future__ import annotations

import ctypes
import os
import sys

import torch


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, so containers and taskset are respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(ranks_here: int = 1) -> int:
    """The cores of this host shared evenly among its ranks. Measured on the 2-core dev machine
    (docs/benchmarks.md, "Single-device decode"): one process decodes faster with 2 threads than with 1,
    and tp=2 ranks with 1 thread each; more threads than cores only adds contention."""
    return max(1, usable_cores() // max(1, ranks_here))


def set_threads(n: int | None, ranks_here: int = 1) -> int:
    """Pin torch's intra-op threads to n (or $MESHLM_THREADS, or the cores per rank on this host)."""
    if n is None:
        env = os.environ.get("MESHLM_THREADS")
        n = int(env) if env else default_threads(ranks_here)
    n = max(1, int(n))
    torch.set_num_threads(n)
    return n


def keep_freed_memory() -> bool:
    """Keep freed tensors (up to 32 MiB each) in the glibc heap instead of returning them to the OS.

    By default glibc maps each tensor over its mmap threshold afresh and unmaps it when freed, so every
    large activation of every step page-faults its memory back in: about 0.5 s of a 2.8 s, 2048-token prefill step
    of SmolLM2 on two cores. Linux with glibc only; False where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
                    and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False
