"""Per-process intra-op thread count."""

from __future__ import annotations

import os

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
