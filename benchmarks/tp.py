"""Tensor parallelism on one CPU host: tokens/s and collective overhead at tp=1 and tp=2, plus gloo latency.

    python benchmarks/tp.py [--models llama-100m llama-400m] [--runs 3] [--transport gloo [shm]] [--json F]
    python benchmarks/tp.py --report F       # tables and chart again from a --json file

Each (model, layout) runs in a fresh process, so peak RSS is that layout's own; the paged KV pool is a
fixed KV_MB per rank, so RSS compares weights rather than pool sizing. tp=2 runs once per --transport
(MESHLM_TRANSPORT in the ranks' environment; gloo is torch.distributed's TCP transport).
Prefill: one 512-token prompt, max_tokens=1; tokens/s = 512 / ttft. Decode: batch 1, a 16-token prompt
then 128 new tokens (ignore_eos); tokens/s = decode_tokens_per_s. Medians of --runs after a warm-up.
Comm overhead = rank 0's tp collective seconds / wall seconds of the phase (stats reset before each run;
a decode run's one prompt pass is removed as 1/new of its collective time). The all-reduce
microbenchmark times gloo between two fresh processes at one decode step's and one prefill's payload.
On a shared machine each timed run takes the benchmarks' lock (common.quiet_run), waits (up to --wait s)
for other CPU load to drop under 20%, and is repeated (up to 3 times) when other processes took more than
20% of the CPUs during it; the table reports the highest such share among the kept runs.
Progress goes to stderr; the markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (tp, intra-op threads per rank)
DECODE_PROMPT = 16
KV_MB = 128  # per rank; the longest sequence here (528 tokens of llama-400m at tp=1) needs 52 MB


def tp_seconds(stats: dict) -> tuple[float, int]:
    """Seconds and calls in tensor-parallel collectives from one rank's comm_stats()."""
    ops = [v for k, v in stats.items() if k.startswith("tp/")]
    return sum(v["seconds"] for v in ops), sum(int(v["calls"]) for v in ops)


def quiet(llm: Any, prompts: Callable[[int], list[list[int]]], params: Any, wait: float, tag: str,
          tries: int = 3) -> tuple[Any, dict, float]:
    """Generate prompts(attempt) under the run lock; retry (up to `tries`, each with a fresh prompt, so no
    prefix-cache hit) while other processes took over 20% of the CPUs.

    Returns (output, rank 0's comm stats, other load during the kept run)."""
    for attempt in range(tries):
        with common.quiet_run(wait), common.other_load() as during:
            llm.reset_comm_stats()
            out = llm.generate(prompts(attempt), params)[0]
        if during[0] <= 0.2 or attempt == tries - 1:
            return out, llm.comm_stats()[0], during[0]
        common.log(f"  {tag}: other processes used {during[0]:.0%} of the CPUs during the run; again")


def measure(model: str, tp: int, threads: int, prompt: int, new: int, runs: int, wait: float) -> dict:
    """Load `model` at (tp, threads) in this process and time prefill and decode (medians of `runs`)."""
    from meshlm import LLM, SamplingParams
    from meshlm.engine.engine import EngineConfig

    path = common.random_llama(model)
    vocab = common.MODELS[model]["vocab_size"]
    # A fresh prompt per run (seed): a repeated one would hit the prefix cache and skip its prefill.
    long = lambda seed: [common.prompt_ids(prompt, vocab, seed)]
    short = lambda seed: [common.prompt_ids(DECODE_PROMPT, vocab, seed)]
    once = SamplingParams(max_tokens=1, ignore_eos=True)
    many = SamplingParams(max_tokens=new, ignore_eos=True)
    pre_tps, pre_ratio, dec_tps, dec_ratio, dec_ms, calls, transport = [], [], [], [], [], 0, "-"
    load: list[float] = []  # other processes' share of the CPUs during each kept run
    tag = f"{model} tp={tp} threads={threads}"
    with LLM(str(path), tp=tp, threads=threads, dtype="float32", progress=False,
             engine=EngineConfig(kv_cache_mb=KV_MB)) as llm:
        llm.generate(short(1000), SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up: both phases
        llm.generate(long(1001), once)
        for r in range(runs):
            out, stats, other = quiet(llm, lambda a, r=r: long(10 * r + a), once, wait, tag)
            coll, _ = tp_seconds(stats)
            pre_tps.append(prompt / out.ttft_s)
            pre_ratio.append(coll / out.ttft_s)
            load.append(other)
            common.log(f"  {tag} prefill run {r + 1}: {pre_tps[-1]:.0f} tok/s, comm {pre_ratio[-1]:.0%}, "
                       f"other load {other:.0%}")
        for r in range(runs):
            out, stats, other = quiet(llm, lambda a, r=r: short(100 + 10 * r + a), many, wait, tag)
            coll, calls = tp_seconds(stats)
            transport = str(stats.get("tp/all_reduce", {}).get("transport", "gloo" if tp > 1 else "-"))
            coll *= (new - 1) / new  # drop the prompt's forward pass: one of `new` passes
            dec_tps.append(out.decode_tokens_per_s)
            dec_ratio.append(coll / out.decode_s)
            dec_ms.append(1e3 * coll / (new - 1))
            load.append(other)
            common.log(f"  {tag} decode run {r + 1}: {dec_tps[-1]:.1f} tok/s, comm {dec_ratio[-1]:.0%}, "
                       f"other load {other:.0%}")
        info = llm.rank_info()
    med = common.median
    return {"model": model, "tp": tp, "threads": threads, "transport": transport, "prefill_tps": med(pre_tps),
            "decode_tps": med(dec_tps), "prefill_ratio": med(pre_ratio), "decode_ratio": med(dec_ratio),
            "coll_ms_per_step": med(dec_ms), "coll_calls_per_step": calls / new,
            "weight_mb": [i["weight_mb"] for i in info], "peak_rss_mb": [i["peak_rss_mb"] for i in info],
            "anon_added_mb": [i.get("anon_added_mb", float("nan")) for i in info], "load": max(load)}


def _allreduce_rank(rank: int, port: int, sizes: dict[str, int], iters: dict[str, int], q) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    for name, n in sizes.items():
        t = torch.randn(n)
        for _ in range(20):
            dist.all_reduce(t)
        times = []
        for _ in range(iters[name]):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        out[name] = times
    dist.barrier()
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def allreduce_latency(sizes: dict[str, int], iters: dict[str, int]) -> dict[str, dict[str, float]]:
    """Median / p90 / p99 microseconds of a 2-process gloo all-reduce of each float32 size."""
    import multiprocessing as mp

    from meshlm.parallel.launch import free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, port, sizes, iters, q)) for r in range(2)]
    for p in procs:
        p.start()
    times = q.get(timeout=600)
    for p in procs:
        p.join()
    return {name: {"bytes": 4 * sizes[name], "median_us": 1e6 * common.median(t),
                   "p90_us": 1e6 * common.percentile(t, 90), "p99_us": 1e6 * common.percentile(t, 99),
                   "n": len(t)} for name, t in times.items()}


def run_child(model: str, tp: int, threads: int, transport: str, args: argparse.Namespace) -> dict:
    """measure() in a fresh interpreter (clean peak RSS); its last stdout line is the JSON result."""
    common.log(f"{model} tp={tp} threads={threads} {transport if tp > 1 else ''}")
    job = [model, tp, threads, args.prompt, args.new, args.runs, args.wait]
    env = {**os.environ, "MESHLM_TRANSPORT": transport}
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                         text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _layout(r: dict) -> str:
    s = f"tp={r['tp']}, {r['threads']} thread{'s' * (r['threads'] > 1)}"
    return s + (f" / rank, {r['transport']}" if r["tp"] > 1 else "")


def tables(results: list[dict], lat: dict[str, dict[str, float]], prompt: int) -> str:
    """Markdown: the throughput table, the all-reduce latency table, and the per-step arithmetic."""
    lines = [f"| Model | Layout | Prefill tok/s ({prompt}) | Decode tok/s | Prefill comm | Decode comm "
             "| Weights MB / rank | Peak RSS MB / rank | Max other load |", "|---|---|" + "---:|" * 7]
    for r in results:
        pct = (lambda x: f"{100 * x:.0f}%") if r["tp"] > 1 else (lambda x: "-")
        lines.append(f"| {r['model']} | {_layout(r)} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} "
                     f"| {pct(r['prefill_ratio'])} | {pct(r['decode_ratio'])} "
                     f"| {' + '.join(f'{w:.0f}' for w in r['weight_mb'])} "
                     f"| {' + '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} | {100 * r['load']:.0f}% |")
    lines += ["", "| gloo all-reduce, 2 processes, 1 thread each | Bytes | Median us | p90 us | p99 us "
              "| Calls |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {v['bytes']:,} | {v['median_us']:.0f} | {v['p90_us']:.0f} | {v['p99_us']:.0f} "
              f"| {v['n']} |" for n, v in lat.items()]
    lines += ["", "| Model | Phase | tp=1 ms (1 thread / 2 threads) | tp=2 ms | Collectives | x gloo median "
              "= ms | Measured collective ms | Measured ms per collective |", "|---|---|" + "---:|" * 6]
    for r in (r for r in results if r["tp"] > 1):
        one, two = (next(o for o in results if (o["model"], o["tp"], o["threads"]) == (r["model"], 1, t))
                    for t in (1, 2))
        n, pre_ms = r["coll_calls_per_step"], 1e3 * prompt / r["prefill_tps"]
        for phase, step, us, coll in (
                ("decode step", lambda x: 1e3 / x["decode_tps"], lat[f"decode step, {r['model']}"],
                 r["coll_ms_per_step"]),
                (f"prefill {prompt}", lambda x: 1e3 * prompt / x["prefill_tps"],
                 lat[f"prefill {prompt}, {r['model']}"], r["prefill_ratio"] * pre_ms)):
            lines.append(f"| {r['model']} {r['transport']} | {phase} | {step(one):.1f} / {step(two):.1f} "
                         f"| {step(r):.1f} | {n:.0f} | {n * us['median_us'] / 1e3:.1f} | {coll:.1f} "
                         f"| {coll / n:.2f} |")
    return "\n".join(lines)


def chart(results: list[dict], models: list[str], png: Path) -> None:
    """Grouped bars: prefill and decode tokens/s per model and layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(_layout(r) for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(layouts)
    for ax, key, title in zip(axes, ("prefill_tps", "decode_tps"), ("Prefill tok/s (one 512-token prompt)",
                                                                      "Decode tok/s (batch 1)")):
        for j, lay in enumerate(layouts):
            ys = [next((r[key] for r in results if (r["model"], _layout(r)) == (m, lay)), 0.0)
                  for m in models]
            xs = [i + (j - (len(layouts) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, ys, width, label=lay)
            ax.bar_label(bars, fmt="%.0f" if key == "prefill_tps" else "%.1f", fontsize=8)
        ax.set_xticks(range(len(models)), models)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"meshlm fp32 on {common.machine()}", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    """Parse arguments, run the microbenchmark and every layout, print tables, write the chart."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(common.MODELS), choices=list(common.MODELS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512, help="prefill prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="decode tokens")
    ap.add_argument("--transport", nargs="+", default=["gloo"], help="tp=2 once per transport (gloo, shm)")
    ap.add_argument("--wait", type=float, default=60.0,
                    help="before each timed run, wait up to this many seconds for other CPU load to stop")
    ap.add_argument("--png", type=Path, default=Path("docs/img/tp_cpu.png"))
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--report", type=Path, help="only print the tables and draw the chart of a --json file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from meshlm.parallel.launch import die_with_parent

        die_with_parent()
        print(json.dumps(measure(*json.loads(args.child))))
        return
    if args.report:
        raw = json.loads(args.report.read_text())
        results, lat, prompt = raw["results"], raw["allreduce"], raw.get("prompt", args.prompt)
        chart(results, list(dict.fromkeys(r["model"] for r in results)), args.png)
        print(f"Machine: {raw.get('machine', common.machine())}\n\n{tables(results, lat, prompt)}")
        return
    t0 = time.time()
    for m in args.models:
        common.random_llama(m)
    sizes, iters = {}, {}
    for m in args.models:
        h = common.MODELS[m]["hidden_size"]
        sizes[f"decode step, {m}"], iters[f"decode step, {m}"] = h, 2000
        sizes[f"prefill {args.prompt}, {m}"], iters[f"prefill {args.prompt}, {m}"] = args.prompt * h, 100
    with common.quiet_run(args.wait) as busy:
        common.log(f"gloo all-reduce microbenchmark (other load {busy:.0%})")
        lat = allreduce_latency(sizes, iters)
    results = []
    for m in args.models:
        for tp, th in LAYOUTS:
            for transport in args.transport if tp > 1 else ["gloo"]:
                results.append(run_child(m, tp, th, transport, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": common.machine(), "prompt": args.prompt, "new": args.new,
                                         "runs": args.runs, "results": results, "allreduce": lat}, indent=1))
    chart(results, args.models, args.png)
    print(f"Machine: {common.machine()}\n\n{tables(results, lat, args.prompt)}")
    common.log(f"done in {time.time() - t0:.0f}s; chart in {args.png}")


if __name__ == "__main__":
    main()
