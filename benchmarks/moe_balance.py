"""Expert load balancing and expert buffering on one CPU host.

    python benchmarks/moe_balance.py [--models moe-16x upcycled] [--runs 3] [--json F]
    python benchmarks/moe_balance.py --smoke      # a tiny random MoE, one run: checks the script, times nothing

Balance: ep=2 with --redundant-experts 2 under a skewed workload (a batch of 8 prompts of one repeated token, so
routing concentrates on a few experts); max / mean rank load per MoE layer (meshlm_expert_balance_ratio, mean
over layers, over the last 64 steps) and tokens/s of the batch (tokens over wall time) before and after
LLM.rebalance_experts(), with the expert copies it loaded. Buffering: tp=1, --expert-budget of one expert, a
quarter, half and all of the experts; decode tokens/s (batch 1, 16-token prompt, 64 new tokens), hit rate
and seconds reading experts.
Medians of --runs after a warm-up, each under the benchmarks' lock (common.quiet_run). Markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import common
import torch
from moe import random_moe, upcycled

NEW, BATCH, PROMPT = 64, 8, 16


def skewed(vocab: int) -> list[list[int]]:
    """BATCH prompts of one repeated token: routing concentrates on that token's experts."""
    return [[7 + i % 2] * PROMPT for i in range(BATCH)]


def balance_rows(model: Path, runs: int, wait: float) -> list[dict]:
    """Balance and batch decode tokens/s before and after one rebalance, ep=2, 2 redundant experts."""
    from meshlm import LLM, SamplingParams

    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    rows = []
    with LLM(str(model), ep=2, redundant_experts=2, dtype="float32", progress=False) as llm:
        prompts = skewed(llm.cfg.vocab_size)
        llm.generate(prompts, params)  # warm, fills the window
        for phase in ("before", "after"):
            moved = sum(r["moved"] for r in llm.rebalance_experts()) if phase == "after" else 0
            tok_s = []
            for _ in range(runs):
                with common.quiet_run(wait):
                    t0 = time.perf_counter()
                    outs = llm.generate(prompts, params)
                    tok_s.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
            f = llm.engine.stats().experts
            rows.append({"model": model.name, "phase": phase, "balance": statistics.mean(f.balance.values()),
                         "worst_layer": max(f.balance.values()), "decode_tok_s": statistics.median(tok_s),
                         "moved": moved})
    return rows


def budget_rows(model: Path, runs: int, wait: float) -> list[dict]:
    """Decode tokens/s and hit rate against the expert budget, tp=1."""
    from meshlm import LLM, SamplingParams
    from meshlm.checkpoint import open_checkpoint
    from meshlm.engine.expert_buffer import expert_bytes

    cfg = open_checkpoint(str(model)).cfg
    one = expert_bytes(cfg, torch.float32)
    total = cfg.num_experts * sum(cfg.is_sparse(i) for i in range(cfg.num_layers))
    rows = []
    for label, n in (("1 expert", 1), ("1/4", total // 4), ("1/2", total // 2), ("all", total)):
        with LLM(str(model), expert_budget=max(1, n) * one, dtype="float32", progress=False) as llm:
            prompt = common.prompt_ids(PROMPT, cfg.vocab_size, 99)
            llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
            tok_s = []
            for r in range(runs):
                with common.quiet_run(wait):
                    out = llm.generate([common.prompt_ids(PROMPT, cfg.vocab_size, 100 + r)],
                                       SamplingParams(max_tokens=NEW, ignore_eos=True))[0]
                tok_s.append(out.decode_tokens_per_s)
            buf = llm.expert_stats()[0]["buffer"]
        rows.append({"model": model.name, "budget": label, "experts": max(1, n), "of": total,
                     "decode_tok_s": statistics.median(tok_s), "hit_rate": buf["hit_rate"],
                     "fetch_s": buf["fetch_seconds"]})
    return rows


def tables(bal: list[dict], buf: list[dict]) -> str:
    """Markdown tables of both parts."""
    out = ["| model | rebalance | max/mean rank load (mean of layers) | worst layer | decode tok/s (batch 8) "
           "| experts loaded |", "|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['phase']} | {r['balance']:.3f} | {r['worst_layer']:.3f} | {r['decode_tok_s']:.1f} "
            f"| {r['moved']} |" for r in bal]
    out += ["", "| model | expert budget | resident experts | decode tok/s | hit rate | s reading experts |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['budget']} | {r['experts']} of {r['of']} | {r['decode_tok_s']:.1f} | "
            f"{r['hit_rate']:.1%} | {r['fetch_s']:.3f} |" for r in buf]
    return "\n".join(out)


def main() -> int:
    """Run both parts for every model and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["moe-16x", "upcycled"], choices=["upcycled", "moe-16x", "smoke"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a quiet machine per run")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--smoke", action="store_true", help="a tiny random MoE, one run, no waiting")
    a = p.parse_args()
    if a.smoke:
        a.models, a.runs, a.wait = ["smoke"], 1, 0.0
    bal, buf = [], []
    for name in a.models:
        model = upcycled() if name == "upcycled" else random_moe(name)
        common.log(f"{name}: balance")
        bal += balance_rows(model, a.runs, a.wait)
        common.log(f"{name}: expert budget")
        buf += budget_rows(model, a.runs, a.wait)
    if a.json:
        a.json.write_text(json.dumps({"balance": bal, "budget": buf}, indent=1))
    print(tables(bal, buf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
