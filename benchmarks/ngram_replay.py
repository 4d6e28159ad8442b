"""Replays the n-gram proposer over greedy outputs of the grounded task: tokens per step and the step-cost
speedup for fixed k, for the policy's own choice (engine/spec_policy.py), and with proposals trimmed by the
n-gram match length. Exact without timing anything: greedy outputs do not depend on speculation, so the
accepted prefix of each proposal is known from the plain output.

    python benchmarks/ngram_replay.py [--prompts 8] [--new 96] [--row 0.09] [--only-edit]

--row: a verified row's cost in target steps at batch 1 (docs/benchmarks.md: verify cost 1.36 at k = 4).
"""

from __future__ import annotations

import argparse

import numpy as np
import speculative as bench

from meshlm.engine.spec_policy import SpecPolicy
from meshlm.engine.speculative import NgramProposer


def match_length(tokens: np.ndarray, most: int = 16) -> int:
    """Length (<= most) of the longest earlier match of tokens' suffix, 0 without one."""
    best = 0
    for j in np.flatnonzero(tokens[:-1] == tokens[-1]):
        n = 1
        while n < most and j - n >= 0 and tokens[j - n] == tokens[len(tokens) - 1 - n]:
            n += 1
        best = max(best, n)
    return best


def stepped(length: int) -> int:
    """k from the match length: 1 for a 1-token match, 4 under 4, 8 under 8, else 16."""
    return 1 if length < 2 else 4 if length < 4 else 8 if length < 8 else 16


def replay(runs, row: float, k: int, policy: bool, trim) -> tuple[float, float]:
    """(tokens per step, tokens per target-step cost) over every (prompt, output)."""
    ngram, tokens, steps, cost = NgramProposer(1, 4), 0, 0, 0.0
    pol = SpecPolicy(k)
    for t in (1, 1 + k):  # the policy's costs: a step of T tokens costs 1 + row * (T - 1)
        pol.observe_step(t, 1 + row * (t - 1))
    pol.observe_propose(k, 0.0)
    for i, (prompt, out) in enumerate(runs):
        t = 0  # out[0] came from the prompt pass
        while t + 1 < len(out):
            seq = prompt + out[:t + 1]
            cap = min(k, len(out) - t - 1)
            n = pol.choose([str(i)], [cap], [False])[0] if policy else cap
            prop = ngram.lookup(seq, n)
            if trim:
                prop = prop[:stepped(match_length(np.asarray(seq)))]
            kept = 0
            while kept < len(prop) and prop[kept] == out[t + 1 + kept]:
                kept += 1
            if prop:
                pol.observe_verify(str(i), len(prop), kept)
            t, tokens, steps, cost = t + kept + 1, tokens + kept + 1, steps + 1, cost + 1 + row * len(prop)
        pol.release(str(i))
    return tokens / steps, tokens / cost


def main() -> None:
    """Greedy outputs of the grounded prompts, then each proposal rule replayed over them."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--row", type=float, default=0.09)
    ap.add_argument("--only-edit", action="store_true", help="the edit prompts only (every other one)")
    args = ap.parse_args()
    from meshlm import SamplingParams

    job = {"target": bench.target_path("float32"), "draft": None, "k": 4, "threads": None, "kv_mb": 512,
           "layout": "tp1", "proposer": "none"}
    with bench.open_llm(job, True) as llm:
        prompts = bench.task_prompts(llm, "grounded", args.prompts)[::2 if args.only_edit else 1]
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.new, ignore_eos=True))
    runs = [(p, list(o.token_ids)) for p, o in zip(prompts, outs)]
    print("| rule | k | tokens / step | step-cost speedup |\n|---|---:|---:|---:|")
    for name, policy, trim, ks in (("fixed k", False, False, (2, 4, 6, 8, 16)), ("policy", True, False, (4, 8, 16)),
                                   ("policy, trimmed by match length", True, True, (4, 8, 16))):
        for k in ks:
            tps, speedup = replay(runs, args.row, k, policy, trim)
            print(f"| {name} | {k} | {tps:.2f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
