"""fp32 against bf16 F.linear on this CPU at the engine's shapes: is bf16 a way to batch faster?

    python benchmarks/gemm.py [--threads 2] [--rows 38 64 2048] [--seconds 2] [--packed]

x [rows, 576] times W^T for W [1536, 576] (SmolLM2's gate/up projection): 38 and 64 rows are decode
batches of the 64-request engine benchmark, 2048 a prefill step. Each timing cycles through enough
weight matrices (40) that they stream from memory, as in a model step, and holds the benchmarks' lock
after waiting for a quiet machine. Prints GFLOP/s per dtype and the bf16 / fp32 ratio. --packed adds
oneDNN's matmul over weights reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`), in both dtypes: what a step costs when
the weights are not repacked on every call.
"""

from __future__ import annotations

import argparse
import time

import common
import torch
import torch.nn.functional as F

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[38, 64, 2048])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--packed", action="store_true", help="also oneDNN over prepacked weights, both dtypes")
    a = ap.parse_args()
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
