"""Where a decode step's time goes, against what the planner's cost model says for each part.

    python benchmarks/decode_parts.py [--model llama-100m] [--profile PATH] [--new 32] [--runs 3]

One rank (tp=1, 1 thread) of meshlm.LLM on a benchmark model. Measured per decode step (batch 1):
  step       (a --new-token run - a 1-token run) / (new - 1), the planner benchmark's measure
  parts      the same runs with wrapped forwards timing every Linear (by projection), the attention core
             (self_attn less its linears), RMSNorms, the MLP's elementwise, the head, and the step
             outside the model forward (engine, sampling, argmax); the hooks' own cost is the hooked
             step less the plain step
  streaming  F.linear over the model's own weights in forward order, one row: the bandwidth a decode
             step can reach, against the calibration's GEMV pool
Predicted: meshlm.plan.cost's parts for the same step from the profile. Holds the benchmarks' lock.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import common
import torch

ROOT = Path(__file__).resolve().parent.parent


def step_seconds(llm, vocab: int, new: int, runs: int, rng: random.Random) -> float:
    """Median seconds per decode step over `runs` (new-token run - 1-token run) / (new - 1)."""
    from meshlm import SamplingParams

    ids = lambda: [[rng.randrange(3, vocab) for _ in range(16)]]
    steps = []
    for _ in range(runs):
        t0 = time.perf_counter()
        llm.generate(ids(), SamplingParams(max_tokens=1, ignore_eos=True))
        a = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.generate(ids(), SamplingParams(max_tokens=new, ignore_eos=True))
        steps.append((time.perf_counter() - t0 - a) / (new - 1))
    return statistics.median(steps)


class Clock:
    """Wraps callables (modules' forward methods by default) to add their wall seconds to a named bucket (a
    decoder layer calls its parts' .forward directly, so module hooks would not fire)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.wrapped: list[tuple[object, str, object]] = []  # (owner, attribute, original)

    def watch(self, owner: object, name: str, attr: str = "forward") -> None:
        """Time calls of `owner.attr` (a module's forward unless told) into bucket `name`."""
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.total[name] += time.perf_counter() - t0
            return out

        self.wrapped.append((owner, attr, fn))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        """Put every wrapped callable back."""
        for owner, attr, fn in reversed(self.wrapped):
            setattr(owner, attr, fn)
        self.wrapped.clear()


def parts(llm, vocab: int, new: int, runs: int, rng: random.Random) -> dict[str, float]:
    """Seconds per decode step by part (hooked runs, differenced like step_seconds)."""
    from meshlm import SamplingParams

    model = llm.executor.worker.runner.model
    runner = llm.executor.worker.runner
    clock = Clock()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear):
            clock.watch(mod, "linear " + leaf)
        elif leaf in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "norm"):
            clock.watch(mod, leaf if "norm" not in leaf else "rmsnorm")
    clock.watch(model, "model forward")
    fwd = runner.forward

    def timed_forward(*a, **k):
        t0 = time.perf_counter()
        out = fwd(*a, **k)
        clock.total["runner forward"] += time.perf_counter() - t0
        return out

    runner.forward = timed_forward
    ids = lambda: [[rng.randrange(3, vocab) for _ in range(16)]]
    per = []
    for _ in range(runs):
        clock.total.clear()
        t0 = time.perf_counter()
        llm.generate(ids(), SamplingParams(max_tokens=1, ignore_eos=True))
        a, before = time.perf_counter() - t0, dict(clock.total)
        clock.total.clear()
        t0 = time.perf_counter()
        llm.generate(ids(), SamplingParams(max_tokens=new, ignore_eos=True))
        b = time.perf_counter() - t0
        d = {k: (v - before.get(k, 0.0)) / (new - 1) for k, v in clock.total.items()}
        d["step"] = (b - a) / (new - 1)
        per.append(d)
    runner.forward = fwd
    out = {k: statistics.median(p.get(k, 0.0) for p in per) for k in per[0]}
    lin = sum(v for k, v in out.items() if k.startswith("linear ") and k != "linear lm_head")
    out["attention core"] = out["self_attn"] - sum(out.get(f"linear {n}", 0.0) for n in
                                                   ("q_proj", "k_proj", "v_proj", "o_proj"))
    out["mlp elementwise"] = out["mlp"] - sum(out.get(f"linear {n}", 0.0) for n in
                                              ("gate_proj", "up_proj", "down_proj"))
    out["layer linears"] = lin
    out["outside model forward"] = out["step"] - out["model forward"]
    return out


def streaming(model, reps: int = 5) -> tuple[float, float]:
    """(seconds, bytes) of one row through every weight of the model in forward order (median of reps)."""
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in ws}
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for w in ws:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), nbytes


def predicted(cfg, cluster, ctx: float) -> dict[str, float]:
    """The cost model's parts of one tp=1 decode step (batch 1, `ctx` keys)."""
    from meshlm.plan.cost import ACT_H, ACT_I, ACT_QKV, Model, Pass
    from meshlm.plan.layout import Layout

    one = replace(cluster, node=replace(cluster.node, devices=1))  # the step runs on one thread
    m = Model(cfg, Layout(1, 1, 1), one, "float32")
    (share,) = m.shares
    r, h, d = m.rates(1), cfg.hidden_size, cfg.head_dim
    attn_w = 2 * h * share.q_heads * d + 2 * h * share.kv_heads * d
    lin = (attn_w + 3 * h * share.inter) * share.layers * 4 / r.bandwidth
    kv = 2 * share.kv_heads * d * ctx * share.layers * 4 / r.bandwidth
    head = share.head_params * 4 / r.bandwidth
    act = (ACT_H * h + ACT_I * share.inter + ACT_QKV * (share.q_heads + 2 * share.kv_heads) * d) \
        * share.layers * 4 / r.bandwidth
    return {"layer linears": lin, "attention (KV read)": kv, "head": head, "activations": act,
            "layer overhead": share.layers * r.layer_overhead,
            "step overhead": cluster.node.device.step_overhead,
            "step": m.stage(0, Pass(1, ctx, ctx, 1), 1).compute}


def main() -> int:
    """Measure and print the parts of one decode step against the cost model's."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-100m")
    ap.add_argument("--profile", default=str(common.CACHE / "planner-profile.json"))
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from meshlm import LLM
    from meshlm.plan import cluster as clusters

    cluster = clusters.load_file(args.profile)
    path = common.random_llama(args.model)
    rng = random.Random(0)
    with common.quiet_run(120), LLM(str(path), threads=1, progress=False) as llm:
        torch.set_num_threads(1)
        vocab = llm.cfg.vocab_size
        step_seconds(llm, vocab, 4, 1, rng)  # warm-up
        plain = step_seconds(llm, vocab, args.new, args.runs, rng)
        hooked = parts(llm, vocab, args.new, args.runs, rng)
        sec, nbytes = streaming(llm.executor.worker.runner.model)
    pred = predicted(llm.cfg, cluster, 16 + args.new / 2)
    bw = cluster.node.device.bandwidth  # {dtype: bytes/s}; the runs here are fp32
    profile_bw = bw.get("float32", next(iter(bw.values())))
    out = {"model": args.model, "plain step": plain, "measured": hooked, "predicted": pred,
           "stream_s": sec, "stream_gbs": nbytes / sec / 1e9,
           "profile_gbs": profile_bw / 1e9}
    for k, v in sorted(hooked.items(), key=lambda kv: -kv[1]):
        print(f"{k:24s} {v * 1e3:8.2f} ms")
    print(f"plain step {plain * 1e3:.2f} ms; weights streamed alone {sec * 1e3:.2f} ms "
          f"({nbytes / sec / 1e9:.1f} GB/s; profile {profile_bw / 1e9:.1f} GB/s)")
    for k, v in pred.items():
        print(f"predicted {k:20s} {v * 1e3:8.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
