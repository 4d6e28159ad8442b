"""Paged decode attention: a C++ extension built from source at first use (paged_decode.cpp), else None.

The decode half of a step reads every running sequence's cached K/V once, in place in the block pool;
the PyTorch fallback (paged_attention.py) gathers them into a padded batch first. $MESHLM_KERNELS=0 turns
the extension off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode.cpp")
_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
_op = None
_tried = False


def _build():
    from torch.utils.cpp_extension import _get_build_directory, load

    cap = torch.backends.cpu.get_cpu_capability()
    cflags = ["-O3", "-fopenmp", *_FLAGS.get("AVX512" if cap.startswith("AVX512") else cap, [])]
    key = _SOURCE.read_bytes() + " ".join(cflags).encode() + torch.__version__.encode()
    name = "meshlm_paged_" + hashlib.sha1(key).hexdigest()[:10]  # new source, flags or torch: a new build
    lib = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    cached = lib.exists()  # named by a hash of source, flags and torch: an existing build is current
    if not cached:
        log.warning("meshlm: compiling the paged decode attention kernel (once, ~20 s)")
    t0 = time.perf_counter()
    if cached:  # load() would re-run the build system's checks (seconds per rank on a busy host)
        try:
            torch.ops.load_library(str(lib))
        except OSError:  # another process is still linking it: build (or wait for that build) as usual
            cached = False
    if not cached:
        load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags, is_python_module=False, verbose=False)
    log.info("meshlm: paged decode kernel %s in %.1f s", "loaded" if cached else "built", time.perf_counter() - t0)
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
