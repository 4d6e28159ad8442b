"""fp32 against bf16 F.linear on this CPU at the engine's shapes: is bf16 a way to batch faster? And
(--ceiling) is meshlm's packed GEMV kernel compute-bound or memory-bound, per weight format?

    python benchmarks/gemm.py [--threads 2] [--rows 38 64 2048] [--seconds 2] [--packed]
    python benchmarks/gemm.py --ceiling [--threads 1 2] [--formats F32 BF16 Q8_0 Q4_0 Q4_1]

x [rows, 576] times W^T for W [1536, 576] (SmolLM2's gate/up projection): 38 and 64 rows are decode
batches of the 64-request engine benchmark, 2048 a prefill step. Each timing cycles through enough
weight matrices (40) that they stream from memory, as in a model step, and holds the benchmarks' lock
after waiting for a quiet machine. Prints GFLOP/s per dtype and the bf16 / fp32 ratio. --packed adds
oneDNN's matmul over weights reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`), in both dtypes: what a step costs when
the weights are not repacked on every call.

--ceiling runs meshlm's kernel (meshlm/kernels/quant.cpp) at M=1, K=576 per format over (a) one weight of ~384
KB that stays in each core's L2, passed many times in one call, and (b) distinct copies of a [1536, 576]
weight totalling 4x the last-level cache on 2 MB pages (as meshlm keeps them), streamed once per call. The
in-cache rate is weight bytes over the time difference between the same call at two row counts (N and N/2), so
per-call and per-weight costs cancel; the streamed one bytes over time (those costs are ~2% there); one thread
is timed in CPU time, so a shared host's preemption drops out. In-cache GB/s is the kernel's compute ceiling;
if the streamed rate matches it and both sit below torch.sum's read rate, the format is compute-bound. Also
prints the core clock (a chain of dependent integer adds, one per cycle) and the in-cache cycles per 16-row x
32-column block.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import time

import common
import torch
import torch.nn.functional as F
from torch import nn

N, K, POOL = 1536, 576, 40


def rate(rows: int, dtype: torch.dtype, seconds: float, packed: bool = False) -> float:
    """GFLOP/s of F.linear([rows, K], [N, K]) over a pool of POOL weights, for `seconds`; `packed`: oneDNN
    over the weights reordered once."""
    x = torch.randn(rows, K).to(dtype)
    ws = [torch.randn(N, K).to(dtype) for _ in range(POOL)]
    if packed:
        ws = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]
        op = lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    else:
        op = lambda w: F.linear(x, w)
    for w in ws[:3]:
        op(w)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for w in ws:
            op(w)
            n += 1
    return 2 * rows * N * K * n / (time.perf_counter() - t0) / 1e9


FORMATS = ["F32", "BF16", "Q8_0", "Q4_0", "Q4_1"]
CACHE_BYTES, STREAM_BYTES = 384 << 10, 128 << 20  # an L2-resident weight; 4x this host's 32 MB L3
_CLOCK_C = r"""
#include <time.h>
double ghz(long n) {  /* n x 16 dependent adds (1 cycle each) over their wall time */
  struct timespec a, b; long x = 0;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; ++i)
    __asm__ volatile(".rept 16\n add $1, %0\n .endr" : "+r"(x));
  clock_gettime(CLOCK_MONOTONIC, &b);
  return 16.0 * n / ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec));
}
"""


def clock_ghz() -> float:
    """This core's clock (GHz): the best of 5 timed chains of dependent adds (compiled once with cc)."""
    lib = common.CACHE / "clock_ghz.so"
    if not lib.exists():
        common.CACHE.mkdir(parents=True, exist_ok=True)
        src = lib.with_suffix(".c")
        src.write_text(_CLOCK_C)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    f = ctypes.CDLL(str(lib)).ghz
    f.restype, f.argtypes = ctypes.c_double, [ctypes.c_long]
    return max(f(20_000_000) for _ in range(5))


def packed(fmt: str, n: int, k: int, copies: int) -> list[torch.Tensor]:
    """`copies` distinct packed [n, k] weights of format fmt (one random weight, cloned)."""
    from meshlm.kernels import qformat as qf
    from meshlm.kernels.pages import to_huge_pages

    w = torch.randn(n, k) * 0.02
    if fmt in ("F32", "BF16"):
        p = qf.float_weight(w.to(torch.bfloat16 if fmt == "BF16" else torch.float32))
    else:
        p = qf.quant_weight(qf.quantize_rows(w, qf.FORMATS[fmt]), qf.FORMATS[fmt], k)
    ws = [p] + [nn.Parameter(p.data.clone(), requires_grad=False) for _ in range(copies - 1)]
    to_huge_pages(ws)  # as meshlm keeps a model's packed weights
    return [w.data for w in ws]


def kernel_seconds(fmt: str, ws: list[torch.Tensor], n: int, k: int, reps: int, tries: int) -> float:
    """Best seconds of one quant_linear_many call at M=1 over the weight list ws repeated `reps` times."""
    from meshlm.kernels import qformat as qf
    from meshlm.kernels.quant import _kernel

    code = (qf.FLOATS[torch.bfloat16] if fmt == "BF16" else qf.F32 if fmt == "F32" else qf.FORMATS[fmt]).code
    x, ws = torch.randn(1, k), ws * reps
    args = (ws, [code] * len(ws), [n] * len(ws), [None] * len(ws))
    op = _kernel().quant_linear_many
    op(x, *args)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter  # 1 thread: CPU time
    best = float("inf")
    for _ in range(tries):
        t0 = clock()
        op(x, *args)
        best = min(best, clock() - t0)
    return best


def kernel_rate(fmt: str, n: int, k: int, copies: int, reps: int, tries: int, slope: bool = True) -> float:
    """Weight GB/s of the kernel: bytes over the time difference between n rows and n/2 rows (slope), or
    over the time of n rows."""
    t, nbytes = {0: 0.0}, {0: 0}
    for rows in (n, n // 2) if slope else (n,):
        ws = packed(fmt, rows, k, copies)
        nbytes[rows] = sum(w.numel() * w.element_size() for w in ws) * reps
        t[rows] = kernel_seconds(fmt, ws, rows, k, reps, tries)
    lo = n // 2 if slope else 0
    return (nbytes[n] - nbytes[lo]) / max(1e-9, t[n] - t[lo]) / 1e9


def ceiling(threads: list[int], formats: list[str], tries: int) -> None:
    """Print the kernel's in-cache and streamed GB/s per format and thread count, against torch.sum."""
    from decode import read_bandwidth

    from meshlm.kernels import qformat as qf

    k = 576
    ghz = clock_ghz()
    print(f"{common.machine()}; core clock {ghz:.2f} GHz (dependent adds)\n")
    print("| format | threads | bytes / 16x32 block | in-cache GB/s | cycles / block | streamed GB/s | "
          "torch.sum GB/s | streamed / read | other load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for th in threads:
        torch.set_num_threads(th)
        for fmt in formats:
            bpw = 4 if fmt == "F32" else 2 if fmt == "BF16" else qf.FORMATS[fmt].block_bytes / 32
            block = 16 * 32 * bpw
            n_cache = max(32, round(CACHE_BYTES / (k * bpw) / 32) * 32)
            copies = round(STREAM_BYTES / (1536 * k * bpw))
            with common.quiet_run(), common.other_load() as other:
                hot = kernel_rate(fmt, n_cache, k, 1, max(8, round(32e6 / (n_cache * k * bpw))), tries)
                cold = kernel_rate(fmt, 1536, k, copies, 1, tries, slope=False)
                read = read_bandwidth(STREAM_BYTES)
            cyc = block / (hot / th * 1e9) * ghz * 1e9  # per core
            print(f"| {fmt} | {th} | {block:.0f} | {hot:.1f} | {cyc:.1f} | {cold:.1f} | {read:.1f} | "
                  f"{cold / read:.0%} | {other[0]:.0%} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", help="intra-op threads (default 2; --ceiling: 1 2)")
    ap.add_argument("--rows", type=int, nargs="+", default=[38, 64, 2048])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--packed", action="store_true", help="also oneDNN over prepacked weights, both dtypes")
    ap.add_argument("--ceiling", action="store_true", help="meshlm's GEMV kernel in cache and streamed, per format")
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--tries", type=int, default=20, help="--ceiling: best of this many calls per rate")
    a = ap.parse_args()
    if a.ceiling:
        return ceiling(a.threads or [1, 2], a.formats, a.tries)
    a.threads = (a.threads or [2])[0]
    torch.set_num_threads(a.threads)
    print(f"{common.machine()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{a.threads} threads\n")
    extra = " fp32 prepacked | bf16 prepacked |" if a.packed else ""
    print("| x rows | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |" + extra + " other load |")
    print("|---:|---:|---:|---:|" + "---:|" * (2 if a.packed else 0) + "---:|")
    for rows in a.rows:
        with common.quiet_run(), common.other_load() as other:
            f32, b16 = rate(rows, torch.float32, a.seconds), rate(rows, torch.bfloat16, a.seconds)
            pk = [rate(rows, dt, a.seconds, packed=True) for dt in (torch.float32, torch.bfloat16)] if a.packed else []
        cells = "".join(f" {v:.1f} |" for v in pk)
        print(f"| {rows} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f} |{cells} {other[0]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
