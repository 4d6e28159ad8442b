"""Per-process intra-op thread count."""

from __future__ import annotations

import os

import torch

# Measured on the 2-core dev machine (docs/benchmarks.md): 1 thread decodes fastest at batch 1.
DEFAULT_THREADS = 1


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads to n (or $MESHLM_THREADS, or the measured default)."""
    if n is None:
        n = int(os.environ.get("MESHLM_THREADS", DEFAULT_THREADS))
    n = max(1, int(n))
    torch.set_num_threads(n)
    return n
