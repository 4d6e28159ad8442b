"""Paged decode attention: a C++ extension built from source at first use (paged_decode.cpp), else None.

The decode half of a step reads every running sequence's cached K/V once, in place in the block pool;
the PyTorch fallback (paged_attention.py) gathers them into a padded batch first. kernel_lse() is the same
walk returning each query head's log-sum-exp beside the fp32 output: a context-parallel rank's partial over
its shard (engine/cp_attention.py). $MESHLM_KERNELS=0 turns the extension off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from meshlm.kernels.build import load_extension

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode.cpp")  # includes ../kernels/attend.h
_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
_op = None
_tried = False


def _build():
    cap = torch.backends.cpu.get_cpu_capability()
    # -ffp-contract=off, as the kernels of meshlm/kernels (attend.h is compiled into both: same bits)
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", *_FLAGS.get("AVX512" if cap.startswith("AVX512") else cap, [])]
    load_extension("meshlm_paged_", [_SOURCE], cflags, "paged decode attention kernel")
    return torch.ops.meshlm_paged.paged_decode


def kernel():
    """The loaded op, built on the first call; None (logged once) when it cannot be had or is turned off."""
    global _op, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MESHLM_KERNELS", "1") != "0":
            try:
                _op = _build()
            except Exception as e:  # no compiler or headers: the PyTorch path serves
                msg = str(e).strip()
                log.warning("meshlm: paged decode kernel unavailable (%s); using the PyTorch path",
                            msg.splitlines()[-1] if msg else type(e).__name__)
    return _op


def kernel_lse():
    """The partial op (out [B, Hq, D] fp32, lse [B, Hq] fp32) of the same extension; None where kernel() is."""
    return None if kernel() is None else torch.ops.meshlm_paged.paged_decode_lse
