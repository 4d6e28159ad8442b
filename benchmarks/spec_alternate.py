"""Throughput with the speculation policy on against no speculation, alternating in ONE process.

    python benchmarks/spec_alternate.py [--layout pp2] [--proposer self-int4] [--requests 16 64] [--rounds 2]

benchmarks/speculative.py runs "none" and "policy on" in separate processes, minutes apart, and this host's
speed drifts 25-30% between minutes; here one LLM (speculative.py's job: float32 SmolLM2 target, the
bundled Q4_1 as draft, k=4, the layout given) runs each batch of N concurrent requests (grounded and chat
prompts in turn, fresh ones each time, so no run finds another's prompts in its prefix cache) with its
speculator detached (no speculation) and attached with a new policy (what a new server does), in turn,
--rounds times. Output tokens / wall seconds of generate(); each run holds the benchmarks' lock.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import common
import speculative as sb


def main() -> None:
    """Alternate and print each run and the ratio of medians."""
    from meshlm import SamplingParams
    from meshlm.engine.spec_engine import Speculator

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", default="pp2", choices=list(sb.LAYOUTS))
    ap.add_argument("--proposer", default="self-int4", choices=list(sb.PROPOSERS))
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--wait", type=float, default=30.0)
    args = ap.parse_args()
    job = {"target": sb.target_path("float32"), "draft": sb.target_path("gguf"), "k": 4, "threads": None,
           "kv_mb": 2048.0, "layout": args.layout, "proposer": args.proposer}
    tags = itertools.count()
    print(f"{common.machine()}; {args.layout} {args.proposer}, k=4, {args.new} tokens per request")
    with sb.open_llm(job, True) as llm:
        eng = llm.engine
        proposer, cfg = eng.spec.proposer, eng.spec.cfg
        llm.generate(sb.mixed_prompts(llm, 2, "warm"), SamplingParams(max_tokens=8, ignore_eos=True))
        for n in args.requests:
            tps: dict[str, list[float]] = {"none": [], "on": []}
            for _ in range(args.rounds):
                for mode in tps:
                    batch = sb.mixed_prompts(llm, n, f"r{next(tags)}")
                    eng.spec = None if mode == "none" else Speculator(proposer, cfg)  # a new policy each run
                    with common.quiet_run(args.wait) as other:
                        tps[mode].append(sb.throughput(llm, batch, args.new)["tps"])
                    print(f"  n={n} {mode:4s} {tps[mode][-1]:6.1f} tok/s (other load {other:.0%})", flush=True)
            on, none = statistics.median(tps["on"]), statistics.median(tps["none"])
            print(f"n={n}: policy on {on:.1f} tok/s, none {none:.1f} tok/s: {on / none:.2f}x")
            eng.spec = Speculator(proposer, cfg)


if __name__ == "__main__":
    sys.exit(main())
