"""Batch-1 decode's share of the memory roofline against model size: what a step's fixed costs weigh.

    python benchmarks/roofline_scale.py [--models llama-100m llama-400m] [--quantize none int8 int4]
                                        [--threads 1] [--new 32] [--runs 3] [--json out.json]

Random Llama checkpoints of benchmarks/common.py (built on first use), each loaded float32 and quantized at
load (`LLM(quantize=...)`: int8 and int4 are the Q8_0 and Q4_0 block formats, int4 with its vocabulary
matrices at Q8_0 as llama-quantize keeps them). Per run (decode.runs_beside_bandwidth): the read bandwidth
(torch.sum over a buffer of the weights' size on 2 MB pages, best of 5) just before and just after a greedy
run of --new tokens after a 1-token prompt; the run's share of the roofline is its decode tokens/s x weight
bytes per token over the mean of its two readings (as benchmarks/decode_gguf.py measures it). A step's costs
besides its weight stream (attention, norms, the head's argmax, the engine's Python) are about fixed per
token, so their share falls as the weights grow. The machine must be otherwise idle (holds the lock).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import decode


def measure(name: str, quantize: str | None, threads: int, new: int, runs: int) -> dict:
    """tokens/s, bandwidth readings and the median share of one model at one precision."""
    from meshlm import LLM, SamplingParams

    llm = LLM(str(common.random_llama(name)), threads=threads, progress=False, quantize=quantize)
    params = SamplingParams(max_tokens=new + 1, temperature=0.0, ignore_eos=True)
    llm.generate([[0]], params)  # warm-up
    outs, bws = decode.runs_beside_bandwidth(llm, [[0]], params, runs, 60.0)
    wbytes = decode.weight_bytes_per_token(llm.model)
    llm.close()
    tps = [out[0].decode_tokens_per_s for out in outs]
    share = decode.roofline_share(tps, bws, wbytes)
    return dict(model=name, quantize=quantize or "none", threads=threads, weight_mb=wbytes / 1e6, tps=tps,
                bw=bws, share=share)


def main() -> None:
    """Measure every (model, precision) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama-100m", "llama-400m"], choices=list(common.MODELS))
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    common.log(common.machine())
    rows = []
    for name in args.models:
        for q in args.quantize:
            rows.append(measure(name, None if q == "none" else q, args.threads, args.new, args.runs))
            r = rows[-1]
            common.log(f"  {name} {r['quantize']}: {common.median(r['tps']):.1f} tok/s, {r['share']:.0%} of the "
                       "roofline")
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{common.machine()}; batch 1, {args.threads} thread(s), {args.new} new tokens, {args.runs} runs\n")
    print("| model | weights | weights MB/token | read GB/s | tok/s | % roofline |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['quantize']} | {r['weight_mb']:.0f} | {common.median(r['bw']):.1f} | "
              f"{common.median(r['tps']):.1f} | {r['share']:.0%} |")


if __name__ == "__main__":
    main()
