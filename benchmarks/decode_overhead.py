"""How much of a batch-1 decode step is not its weight stream: the step against its linear products alone.

    python benchmarks/decode_overhead.py [--model PATH] [--dtype auto] [--threads 1] [--new 32] [--runs 5]

One rank of meshlm.LLM (the bundled SmolLM2-135M unless --model). Measured per decode step:
  step        (a --new-token run - a 1-token run) / (new - 1), as benchmarks/decode_parts.py measures it:
              every layer in one call of the whole-stack decode op (meshlm/kernels/decode.py) where it applies
  per-op      the same with the stack op turned off: the layers op by op, one kernel call per product
  linears     the step's linear products alone (q/k/v, o, gate/up, down of every layer, then the head),
              called back to back through the same kernels.linear / linear_many on one row: the weight
              stream, with the wrappers' own Python cost and one parallel region per call
  overhead    step - linears: norms, RoPE, the KV write, attention, the engine, sampling, Python
  parts       the same step timed inside: the whole-stack op (every decoder layer), the head, and the rest
              (embedding lookup, final norm, sampling, the engine's Python), each against its weight bytes:
              the stack's and the head's read rate, beside --read-gbs when given (the roofline's rate)
  ops         torch calls made from Python per decode step (profiler; views included), and per layer, both
              paths (the stack op's own call, a TorchScript class method, is not a profiler event)
The machine must be otherwise idle for the times to mean anything (holds the benchmarks' lock).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import common
import torch
from decode_parts import Clock, step_seconds


def steps(llm, new: int, runs: int) -> float:
    """Median seconds per decode step (decode_parts.step_seconds: fresh random 16-token prompts)."""
    return step_seconds(llm, llm.cfg.vocab_size, new, runs, random.Random(0))


def linears_seconds(model, dtype: torch.dtype, reps: int) -> float:
    """Median seconds of one row through every linear product of a decode step, as the model calls them."""
    from meshlm.kernels import linear_many

    h = model.cfg.hidden_size
    x = torch.randn(1, 1, h, dtype=dtype)
    calls = []
    for layer in model.layers.values():
        a, m = layer.self_attn, layer.mlp
        xo = torch.randn(1, 1, a.o_proj.in_features, dtype=dtype)
        xi = torch.randn(1, 1, m.down_proj.in_features, dtype=dtype)
        calls += [(linear_many, (x, [a.q_proj, a.k_proj, a.v_proj])), (a.o_proj, (xo,)),
                  (linear_many, (x, [m.gate_proj, m.up_proj])), (m.down_proj, (xi,))]
    if model.lm_head is not None:
        calls.append((model.lm_head, (x,)))
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            for fn, args in calls:
                fn(*args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


@contextlib.contextmanager
def per_op(llm):
    """The layers op by op inside the block: the whole-stack decode op turned off."""
    cache = llm.executor.worker.runner.cache
    stack, cache.stack = cache.stack, None
    try:
        yield
    finally:
        cache.stack = stack


def ops_per_step(llm, new: int) -> collections.Counter:
    """Torch calls made from Python (top-level profiler events) per decode step, by name."""
    from meshlm import SamplingParams

    def count(n: int) -> collections.Counter:
        with torch.profiler.profile() as prof:
            llm.generate([[1] + list(range(100, 131))], SamplingParams(max_tokens=n, ignore_eos=True))
        return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)

    a, b = count(1), count(new)
    return collections.Counter({k: (b[k] - a.get(k, 0)) / (new - 1) for k in b})


def parts_seconds(llm, new: int, runs: int) -> dict[str, float]:
    """Seconds per decode step inside the whole-stack op and the head (wrapped calls), and the step."""
    from meshlm import SamplingParams

    runner = llm.executor.worker.runner
    clock = Clock()
    clock.watch(runner.cache, "stack", attr="stack")
    clock.watch(runner.model.lm_head, "head")
    per_step = []
    try:
        for _ in range(runs):
            clock.total.clear()
            out = llm.generate([[1]], SamplingParams(max_tokens=new + 1, ignore_eos=True))[0]
            steps = new + 1  # the prompt's pass runs both too (one row)
            per_step.append({"step": out.decode_s / new, "stack": clock.total["stack"] / steps,
                             "head": clock.total["head"] / steps})
    finally:
        clock.restore()
    return {k: statistics.median(p[k] for p in per_step) for k in per_step[0]}


def main() -> int:
    """Measure and print a decode step against its weight stream."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint or .gguf (default: the bundled SmolLM2)")
    ap.add_argument("--dtype", default="auto", help="auto (a GGUF's own precision), float32 or bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for an idle machine first")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from meshlm import LLM

    with common.quiet_run(args.wait), LLM(args.model, dtype=args.dtype, threads=args.threads, progress=False) as llm:
        torch.set_num_threads(args.threads)
        model = llm.executor.worker.runner.model
        steps(llm, 4, 1)  # warm-up (and the kernels' first build)
        step = steps(llm, args.new, args.runs)
        lin = linears_seconds(model, llm.executor.worker.dtype, 2 * args.runs)  # the compute dtype
        stacked = llm.executor.worker.runner.cache.stack is not None
        parts = parts_seconds(llm, args.new, args.runs) if stacked and model.lm_head is not None else None
        bytes_layers = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                           if n.startswith("layers.") or ".layers." in n)
        bytes_head = model.lm_head.weight.numel() * model.lm_head.weight.element_size() \
            if model.lm_head is not None else 0
        ops = ops_per_step(llm, min(args.new, 9))
        with per_op(llm):
            op_step = steps(llm, args.new, args.runs)
            op_ops = ops_per_step(llm, min(args.new, 9))
        layers = len(model.layers)
    out = {"model": args.model or "smollm2", "dtype": args.dtype, "threads": args.threads, "stack_op": stacked,
           "step_s": step, "per_op_step_s": op_step, "linears_s": lin, "overhead_s": step - lin,
           "ops_per_step": sum(ops.values()), "ops_per_layer": sum(ops.values()) / layers,
           "per_op_ops_per_step": sum(op_ops.values()), "ops": dict(ops.most_common()), "parts": parts,
           "layer_bytes": bytes_layers, "head_bytes": bytes_head}
    print(f"{common.machine()}")
    print(f"{out['model']} {args.dtype}, {args.threads} thread(s), {layers} layers, per decode step:")
    print(f"  step      {step * 1e3:8.3f} ms  ({1 / step:.1f} tok/s; whole-stack op: {'yes' if stacked else 'no'})")
    print(f"  per-op    {op_step * 1e3:8.3f} ms  ({1 / op_step:.1f} tok/s; the layers op by op)")
    print(f"  linears   {lin * 1e3:8.3f} ms  (the weight stream alone)")
    print(f"  overhead  {(step - lin) * 1e3:8.3f} ms  ({100 * (step - lin) / step:.0f}% of the step)")
    print(f"  ops       {out['ops_per_step']:8.0f}     torch calls from Python "
          f"({out['ops_per_layer']:.1f} per layer on average; op by op: {out['per_op_ops_per_step']:.0f})")
    if parts:
        rest = parts["step"] - parts["stack"] - parts["head"]
        print(f"  parts (one more run, the calls timed): step {parts['step'] * 1e3:.3f} ms =")
        for name, sec, nbytes in (("stack op", parts["stack"], bytes_layers), ("head", parts["head"], bytes_head)):
            print(f"    {name:9s} {sec * 1e3:7.3f} ms  {nbytes / 1e6:6.1f} MB  {nbytes / sec / 1e9:5.1f} GB/s")
        print(f"    rest      {rest * 1e3:7.3f} ms  (embedding, final norm, sampling, the engine's Python)")
    for name, n in ops.most_common(12):
        print(f"    {name:40s} {n:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
