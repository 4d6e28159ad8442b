"""Serving throughput: 64 requests of varied lengths through meshlm's engine vs HF batched generate.

Two arrival patterns: all at once, and a Poisson stream. meshlm runs continuous batching over its
paged KV cache; the HF peer runs static batches with left padding (every queued request at once,
generating until the longest finishes), the way a plain `generate` server works. Same model, dtype,
threads and requests in the same run. Each timed run holds the benchmarks' lock (common.quiet_run) and
records the share of the CPUs other processes used meanwhile. Both engines are warmed up first (untimed),
and each arrival pattern has its own prompts, so no run reuses another's prefix cache.

    python benchmarks/engine.py [--requests 64] [--rate 4] [--threads 2] [--dtype float32]
    python benchmarks/engine.py --pp 2 --threads 1 [--pipeline-depth 1] --no-hf   # the engine over stages
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import common
import torch


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    """n (prompt ids, output length) pairs: prompts 16-512 tokens, outputs 16-192 tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab - 100) for _ in range(rng.randint(16, 512))], rng.randint(16, 192))
            for _ in range(n)]


def arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """Arrival offsets in seconds: all zero, or a Poisson process of `rate` requests/s."""
    if not rate:
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def pct(xs: list[float], q: float) -> float:
    """q-quantile (0..1) of xs."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(name: str, wall: float, ttft: list[float], tpot: list[float], e2e: list[float],
              tokens: int) -> dict:
    """One result row."""
    return {"engine": name, "wall_s": wall, "tok_per_s": tokens / wall, "ttft_p50": pct(ttft, 0.5),
            "ttft_p99": pct(ttft, 0.99), "tpot_p50": pct(tpot, 0.5), "tpot_p99": pct(tpot, 0.99),
            "e2e_p50": pct(e2e, 0.5), "e2e_p99": pct(e2e, 0.99), "tokens": tokens}


def run_meshlm(llm, work, offsets) -> dict:
    """Feed requests at their arrival times into the engine; step until all finish."""
    from meshlm import SamplingParams

    eng = llm.engine
    hits0 = eng.blocks.stats.prefix_hits
    t0 = time.perf_counter()
    pending = list(zip(offsets, work))
    reqs = []
    while pending or eng.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            _, (prompt, n) = pending.pop(0)
            reqs.append(eng.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
        if eng.has_unfinished():
            eng.step()
        elif pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    outs = [r.out for r in reqs]
    row = summarize("meshlm", wall, [o.ttft_s for o in outs],
                    [o.decode_s / max(1, len(o.token_ids) - 1) for o in outs],
                    [o.ttft_s + o.decode_s for o in outs], sum(len(o.token_ids) for o in outs))
    row["prefix_hits"] = eng.blocks.stats.prefix_hits - hits0  # blocks reused from the prefix cache
    return row


class FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first = 0.0

    def put(self, value) -> None:
        """Called with the prompt, then with each new token."""
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        """Called when generation ends."""


def run_hf(model, work, offsets, pad_id: int) -> dict:
    """Static batching: take every arrived request, left-pad, generate to the longest output."""
    t0 = time.perf_counter()
    queue = list(zip(offsets, work))
    ttft, tpot, e2e, tokens = [], [], [], 0
    while queue:
        now = time.perf_counter() - t0
        if queue[0][0] > now:
            time.sleep(queue[0][0] - now)
            now = time.perf_counter() - t0
        batch = [q for q in queue if q[0] <= now]
        queue = queue[len(batch):]
        longest = max(len(p) for _, (p, _) in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, (p, _)) in enumerate(batch):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        new = max(n for _, (_, n) in batch)
        start = time.perf_counter() - t0
        clock = FirstToken()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=pad_id, streamer=clock)
        end = time.perf_counter() - t0
        first = clock.first - t0  # a batch's first token needs its whole prefill
        for off, (_, n) in batch:  # results come back when the whole batch ends
            ttft.append(first - start + (start - off))
            tpot.append((end - first) / max(1, new - 1))
            e2e.append(end - off)
            tokens += n
    return summarize("hf-static", time.perf_counter() - t0, ttft, tpot, e2e, tokens)


def main() -> None:
    """Run both engines on both arrival patterns; print a markdown table and save JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench_engine.json")
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--pp", type=int, default=1, help="meshlm pipeline stages (threads is per rank)")
    ap.add_argument("--pipeline-depth", type=int, default=None, help="engine steps in flight (default pp)")
    ap.add_argument("--no-hf", action="store_true", help="run meshlm only")
    args = ap.parse_args()
    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig

    llm = LLM(None, threads=args.threads, dtype=args.dtype, progress=True, pp=args.pp,
              engine=EngineConfig(pipeline_depth=args.pipeline_depth))
    torch.set_num_threads(args.threads)
    engines = [("meshlm", lambda offs, work: run_meshlm(llm, work, offs))]
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(llm.path), dtype=getattr(torch, args.dtype)).eval()
        engines.append(("hf", lambda offs, work: run_hf(hf, work, offs, pad_id=2)))
    # Each arrival pattern gets its own prompts: with the same ones, the second pattern's meshlm run would
    # find the first's prompts in the prefix cache and skip their prefill. Warm-up: other prompts again,
    # 2 tokens each, all at once through both engines (first-touch of activation memory, lazy init), untimed.
    vocab = llm.cfg.vocab_size
    warm = [(p, 2) for p, _ in workload(args.requests, 99, vocab)]
    for name, run in engines:  # under the lock too: a warm-up takes both cores from anyone's timed run
        print(f"[engine bench] warm-up: {name} ...", file=sys.stderr, flush=True)
        with common.quiet_run(args.wait):
            run([0.0] * len(warm), warm)
    rows = []
    for i, (label, rate) in enumerate((("all at once", None), (f"Poisson {args.rate}/s", args.rate))):
        work = workload(args.requests, i, vocab)
        offs = arrivals(len(work), rate, 0)
        for name, run in engines:
            fn = lambda run=run, offs=offs, work=work: run(offs, work)
            print(f"[engine bench] {label}: {name} ...", file=sys.stderr, flush=True)
            with common.quiet_run(args.wait), common.other_load() as during:
                r = fn()
            r["arrivals"], r["other_load"] = label, during[0]
            if name == "meshlm" and args.pp > 1:
                r["engine"] = f"meshlm pp={args.pp} depth={llm.engine.depth}"
            rows.append(r)
            print(f"[engine bench]   {r['tok_per_s']:.1f} tok/s in {r['wall_s']:.1f}s (other load "
                  f"{r['other_load']:.0%}; prefix-cache blocks reused: {r.get('prefix_hits', '-')})", file=sys.stderr)
    print(f"Machine: {common.machine()}\n")
    print("| arrivals | engine | throughput (tok/s) | wall (s) | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | "
          "end-to-end p50 / p99 (s) | other load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arrivals']} | {r['engine']} | {r['tok_per_s']:.1f} | {r['wall_s']:.0f} | {r['ttft_p50']:.2f} / "
              f"{r['ttft_p99']:.2f} | {r['tpot_p50'] * 1000:.0f} / {r['tpot_p99'] * 1000:.0f} | "
              f"{r['e2e_p50']:.1f} / {r['e2e_p99']:.1f} | {r['other_load']:.0%} |")
    for label in {r["arrivals"] for r in rows} if not args.no_hf else ():
        m, h = (next(r for r in rows if r["arrivals"] == label and r["engine"].startswith(e))
                for e in ("meshlm", "hf-static"))
        print(f"speed-up ({label}): {m['tok_per_s'] / h['tok_per_s']:.1f}x", file=sys.stderr)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    llm.close()


if __name__ == "__main__":
    main()
