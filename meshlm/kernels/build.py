"""Build a C++ extension at first use (torch.utils.cpp_extension) and load it; later processes load the
cached library directly.

The build is named by a hash of its sources (and the headers they include by a relative path), flags and
torch version, so a cached library is current. A build killed midway (a rank killed while compiling) leaves
torch's lock file behind, and torch waits on it forever; a lock older than STALE_LOCK_S, far longer than a
build takes, is removed with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"', re.M)  # headers beside a source: part of the key
STALE_LOCK_S = 600.0  # seconds; building the kernels takes ~30 s


def load_extension(prefix: str, sources: list[Path], cflags: list[str], what: str) -> None:
    """Build (once per source, flags and torch) and load the ops of `sources`; raises when it cannot."""
    from torch.utils.cpp_extension import _get_build_directory, load

    files = sources + sorted({p.parent / h for p in sources for h in _LOCAL_INCLUDE.findall(p.read_text())})
    key = b"".join(p.read_bytes() for p in files) + " ".join(cflags).encode() + torch.__version__.encode()
    name = prefix + hashlib.sha1(key).hexdigest()[:10]
    build_dir = Path(_get_build_directory(name, verbose=False))
    lib = build_dir / f"{name}.so"
    t0 = time.perf_counter()
    if lib.exists():  # load() would re-run the build system's checks (seconds per rank on a busy host)
        try:
            torch.ops.load_library(str(lib))
            log.info("meshlm: %s loaded in %.1f s", what, time.perf_counter() - t0)
            return
        except OSError:  # another process is still linking it: build (or wait for that build) as usual
            pass
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("meshlm: removing a stale build lock %s (a build was killed midway)", lock)
        lock.unlink(missing_ok=True)
    log.warning("meshlm: compiling the %s (once, ~30 s) into %s", what, build_dir)
    load(name=name, sources=[str(p) for p in sources], extra_cflags=cflags, is_python_module=False, verbose=False)
    log.info("meshlm: %s built in %.1f s", what, time.perf_counter() - t0)
