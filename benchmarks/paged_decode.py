"""Decode attention over the paged KV pool: meshlm's C++ kernel against the PyTorch path, and the roofline.

    python benchmarks/paged_decode.py [--threads 2] [--dtypes float32 bfloat16] [--calls 30]

Each row is one layer's decode attention for a batch of sequences whose blocks lie scattered in the pool
(block 16, contexts drawn from [ctx/2, ctx)), cycling through enough copies of the pool (>= 256 MB) that
K/V stream from memory as in a model step: the kernel (engine/paged_decode.cpp, which reads each key and
value row in place) against PagedKVCache's PyTorch path (gather the contexts into a padded batch with
index_select, then SDPA), the path used where the kernel cannot be built. Both give the same result to
rounding (checked here on every row). GB/s counts the K/V bytes attended once; the roofline column is
the read rate of `torch.sum` over 512 MB with the same threads (memory, not cache). Medians of --calls
calls, the two paths alternating; each row holds the benchmarks' lock after waiting for a quiet machine.
"""

from __future__ import annotations

import argparse
import math
import time

import common
import torch

from meshlm.engine import paged_decode
from meshlm.engine.paged_attention import PagedKVCache

SHAPES = {  # name: (query heads, KV heads, head_dim)
    "smollm2": (9, 3, 64),
    "llama3-8b": (32, 8, 128),
}
BS = 16


def batch(hq: int, hkv: int, d: int, b: int, ctx: int, dtype: torch.dtype, seed: int = 0):
    """q, pools and tables for b sequences of ctx/2..ctx tokens scattered over the pool."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(ctx // 2, ctx, (b,), generator=g)
    per = -(-ctx // BS)
    order = torch.randperm(b * per, generator=g)
    k, v = (torch.randn(b * per * BS, hkv, d, generator=g).to(dtype) for _ in range(2))
    tables = order.view(b, per)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    return q, k, v, tables, lens


def fallback(tables, lens, scale) -> PagedKVCache:
    """PagedKVCache planned for the PyTorch path (gather each context's slots, SDPA over the padded batch)."""
    cache = PagedKVCache.__new__(PagedKVCache)
    cache.block_size, cache.kernel, cache.scale, cache.window, cache.device = BS, None, scale, None, torch.device("cpu")
    cache._plan_decode([tuple(t.tolist()) for t in tables], [0] * len(lens), lens.tolist())
    return cache


def cycling(f, pools):
    """A call that runs f(k, v) on the next pool copy each time."""
    i = [0]

    def call():
        k, v = pools[i[0] % len(pools)]
        i[0] += 1
        return f(k, v)

    return call


def median_us(f, calls: int) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e6


def read_gbs(nbytes: int = 512 << 20) -> float:
    """torch.sum's read rate over nbytes of fp32 (best of 10)."""
    buf = torch.ones(max(1, nbytes // 4))
    best = math.inf
    for _ in range(10):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--wait", type=float, default=120.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    op = paged_decode.kernel()
    if op is None:
        raise SystemExit("the paged decode kernel could not be built here (see the log); nothing to compare")
    print(f"{common.machine()}; {a.threads} threads, block {BS}\n")
    print("| model heads | dtype | batch | context | K/V MB | kernel us | PyTorch us | kernel / PyTorch | "
          "kernel GB/s | roofline GB/s | other load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in (getattr(torch, n) for n in a.dtypes):
        for name, (hq, hkv, d) in SHAPES.items():
            for b, ctx in ((1, 512), (8, 512), (40, 300), (64, 600), (16, 2048)):
                q, k, v, tables, lens = batch(hq, hkv, d, b, ctx, dtype)
                scale = 1 / math.sqrt(d)
                extra = (tables, torch.zeros(b, dtype=torch.long), lens, BS, scale)
                cache = fallback(tables, lens, scale)
                tol = 1e-4 if dtype is torch.float32 else 2e-2
                torch.testing.assert_close(op(q, k, v, *extra).float(), cache._decode(q, k, v).float(),
                                           atol=tol, rtol=tol)
                pools = [(k, v)] + [(k.clone(), v.clone())
                                    for _ in range(math.ceil((256 << 20) / (2 * k.nbytes)) - 1)]
                kern_call = cycling(lambda kk, vv, q=q, extra=extra: op(q, kk, vv, *extra), pools)
                torch_call = cycling(lambda kk, vv, q=q, c=cache: c._decode(q, kk, vv), pools)
                nbytes = 2 * int(lens.sum()) * hkv * d * k.element_size()
                with common.quiet_run(a.wait), common.other_load() as other:
                    kern, torch_path = [], []
                    for _ in range(3):  # alternate, so both see the same machine
                        kern.append(median_us(kern_call, a.calls))
                        torch_path.append(median_us(torch_call, max(3, a.calls // 3)))
                    roof = read_gbs()
                del pools
                kt, pt = common.median(kern), common.median(torch_path)
                print(f"| {name} {hq}/{hkv}x{d} | {str(dtype).split('.')[-1]} | {b} | {ctx} | {nbytes / 1e6:.1f} | "
                      f"{kt:.0f} | {pt:.0f} | {kt / pt:.2f} | {nbytes / kt / 1e3:.1f} | {roof:.1f} | "
                      f"{other[0]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
