"""Pipeline parallelism on one CPU host: pp=2 against pp=1 in the same run (throughput, busy, TTFT, timeline).

    python benchmarks/pipeline.py [--model llama-100m] [--runs 3] [--new 64] [--long 2000]
        [--png docs/img/pipeline_cpu.png] [--json out.json]

Every layout runs in a fresh process; every timed run holds the benchmarks' run lock and starts on a quiet
machine (common.quiet_run), and the CPU share other processes took meanwhile is reported. Peers: pp=1 on one
thread (LLM's paged engine), pp=1 on two threads (the two cores pp=2 uses), pp=2 with one thread per stage.
Throughput: 1, 4 and 8 concurrent sequences, each a 32-token prompt then --new tokens (ignore_eos);
tokens/s = generated tokens / wall seconds of generate(), the median of --runs after a warm-up. Busy =
a stage's compute seconds / its wall seconds, from LLM.pipeline_report() of the median run. At 8
sequences pp=2 also sweeps the micro-batch count and compares three stage splits: the cost estimate,
an even split, and one balanced on per-unit seconds measured with forward hooks at pp=1.
TTFT: one --long-token prompt, max_tokens=1, at pp=1 and at pp=2 with 1 (off), 2, 4, 8 and 16 chunks.
Chunk rule: the seconds of each of 8 chunks of that prompt run in sequence in one process, when chunks
are equal in size, equal in FLOPs (meshlm's rule: later chunks are shorter), and equal in estimated cost
with attention at the calibrated SDPA speed (`meshlm plan --calibrate`; shorter still).
The PNG shows the pp=2 timelines (8 sequences; the chunked prompt) and each stage's busy fraction.
Progress goes to stderr; the markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

SHORT = 32
CONCURRENCY = (1, 4, 8)
MICRO_BATCHES = (1, 2, 4, 8)
CHUNKS = (1, 2, 4, 8, 16)
TRACE_CHUNKS = 8  # the timeline shown: what auto chooses for one prompt at pp=2 (4 x pp)
KV_MB = 128


def measured_costs(llm, prompts: list[list[int]], new: int) -> list[float]:
    """Seconds per unit [embedding, layers..., norm + head] of a pp=1 run, timed with forward hooks."""
    import torch

    from meshlm import SamplingParams

    model = llm.model
    units = [model.embed_tokens, *model.layers.values(), model.lm_head]
    starts = [model.embed_tokens, *model.layers.values(), model.norm]
    seconds = [0.0] * len(units)
    marks: dict[int, float] = {}
    hooks = []
    for i, (first, last) in enumerate(zip(starts, units)):
        def start(module, args, i=i) -> None:
            marks[i] = time.perf_counter()

        def stop(module, args, output, i=i) -> None:
            seconds[i] += time.perf_counter() - marks[i]

        hooks += [first.register_forward_pre_hook(start), last.register_forward_hook(stop)]
    with torch.inference_mode():
        llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    for h in hooks:
        h.remove()
    return seconds


def chunk_times(llm, n: int, chunks: int) -> dict[str, dict[str, list[float]]]:
    """Sizes and seconds of each chunk of one n-token prefill in one process: equal-cost vs equal-size."""
    import torch
    from meshlm.engine.static_cache import StaticKVCache

    from meshlm.parallel.pipeline import attention_ratio, chunk_bounds
    from meshlm.plan.cluster import resolve

    model, cfg = llm.model, llm.cfg
    kv_heads = next(iter(model.layers.values())).self_attn.k_proj.out_features // cfg.head_dim
    tokens = torch.tensor([common.prompt_ids(n, cfg.vocab_size, seed=123)])
    out = {}
    speed = resolve("local").node.device.attention_eff  # `meshlm plan --calibrate`'s SDPA / matmul rate
    rules = (("equal size", 0.0), ("equal FLOPs (meshlm)", attention_ratio(cfg)),
             (f"equal cost, attention at {speed:.2f} x the matmul rate", attention_ratio(cfg, speed)))
    for rule, ratio in rules * 2:  # the first pass warms up; the second overwrites it
        cache = StaticKVCache(len(model.layers), 1, n, kv_heads, cfg.head_dim, torch.float32)
        bounds, seconds = chunk_bounds(n, chunks, ratio), []
        with torch.inference_mode():
            for a, b in bounds:
                t0 = time.perf_counter()
                cache.prepare(torch.arange(a, b)[None])
                model(tokens[:, a:b], torch.arange(a, b)[None], cache, logits_index=torch.tensor([[b - a - 1]]))
                seconds.append(time.perf_counter() - t0)
        out[rule] = {"sizes": [b - a for a, b in bounds], "seconds": seconds}
    return out


def timed(llm, prompts: list[list[int]], new: int) -> tuple[float, list[dict], float]:
    """(tokens/s, pipeline reports, TTFT of the first prompt) of one generate()."""
    from meshlm import SamplingParams

    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    dt = time.perf_counter() - t0
    reports = llm.pipeline_report() if llm.dims.pp > 1 else []
    return sum(len(o.token_ids) for o in outs) / dt, reports, outs[0].ttft_s


def busy(reports: list[dict]) -> list[float]:
    """Each rank's busy fraction."""
    return [r["timeline"]["totals"]["busy"] for r in reports]


def median_run(llm, make_prompts, new: int, runs: int, tag: str, wait: float, tries: int = 3) -> dict:
    """The median (by tokens/s) of `runs` runs, each on fresh prompts (no prefix-cache hits at pp=1).

    Each run holds the benchmarks' run lock and starts on a quiet machine (common.quiet_run); a run during
    which other processes took over 20% of the CPUs is run again (up to `tries` times, on fresh prompts);
    the CPU share other processes took during the kept run is kept as "other".
    """
    results = []
    for r in range(runs):
        for attempt in range(tries):
            with common.quiet_run(wait), common.other_load() as other:
                tps, reps, ttft = timed(llm, make_prompts(r + 100 * attempt), new)
            if other[0] <= 0.2 or attempt == tries - 1:
                break
            common.log(f"  {tag} run {r + 1}: other processes took {other[0]:.0%} of the CPUs; again")
        results.append({"tps": tps, "ttft": ttft, "busy": busy(reps), "reports": reps, "other": other[0]})
        common.log(f"  {tag} run {r + 1}: {tps:.1f} tok/s, TTFT {ttft * 1e3:.0f} ms, busy "
                   f"{' / '.join(f'{b:.0%}' for b in results[-1]['busy']) or '-'}, other load {other[0]:.0%}")
    return sorted(results, key=lambda x: x["tps"])[len(results) // 2]


def measure(job: dict) -> dict:
    """One layout in this process: throughput at each concurrency (and pp=2 sweeps), then TTFT."""
    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig
    from meshlm.parallel.pipeline import PipelineSpec

    path, vocab = common.random_llama(job["model"]), common.MODELS[job["model"]]["vocab_size"]
    pp, runs, new, wait = job["pp"], job["runs"], job["new"], job["wait"]
    short = lambda n, seed: [common.prompt_ids(SHORT, vocab, 1000 * seed + 10 * n + i) for i in range(n)]
    long = lambda seed: [common.prompt_ids(job["long"], vocab, 99_000 + seed)]
    kw = dict(pp=pp, threads=job["threads"], progress=False, engine=EngineConfig(kv_cache_mb=KV_MB),
              pp_layers=job.get("layers"), pipeline=PipelineSpec(costs=job.get("costs"), schedule="static"))
    out: dict = {"layout": job["layout"], "throughput": {}, "micro_batches": {}, "ttft": {}}
    with LLM(str(path), **kw) as llm:
        out["layers"] = [i["layers"] for i in llm.rank_info()]
        timed(llm, short(2, 77), 8)  # warm-up
        if job.get("costs_only"):
            return {"costs": measured_costs(llm, short(8, 78), new), "chunk_rule": chunk_times(llm, job["long"], 8)}
        for n in job["concurrency"]:
            r = median_run(llm, lambda s, n=n: short(n, s), new, runs, f"{job['layout']} n={n}", wait)
            out["throughput"][n] = {k: r[k] for k in ("tps", "busy", "other")}
            if n == max(job["concurrency"]) and pp > 1:
                out["timeline"] = r["reports"]
        for m in job.get("micro_batches", ()):
            llm.configure_pipeline(micro_batches=m)
            r = median_run(llm, lambda s: short(8, 50 + s), new, runs, f"{job['layout']} M={m}", wait)
            out["micro_batches"][m] = {k: r[k] for k in ("tps", "busy", "other")}
        if pp > 1:
            llm.configure_pipeline(micro_batches=None)
        for c in job.get("chunks", [None] if job.get("ttft", True) else []):
            if c is not None:
                llm.configure_pipeline(prefill_chunks=c)
            tag = f"{job['layout']} chunks={c}"
            r = median_run(llm, lambda s, c=c: long(s + 10 * (c or 0)), 1, runs, tag, wait)
            out["ttft"][c or 0] = {"ttft": r["ttft"], "busy": r["busy"], "other": r["other"]}
            if c == TRACE_CHUNKS:
                out["prefill_timeline"] = r["reports"]
    return out


def run_child(job: dict) -> dict:
    """measure() in a fresh interpreter; its last stdout line is the JSON result."""
    common.log(job["layout"])
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def pct(xs: list[float]) -> str:
    """'83% / 91%'."""
    return " / ".join(f"{x:.0%}" for x in xs) or "-"


def tables(res: dict[str, dict], args: argparse.Namespace) -> str:
    """Markdown: throughput and busy per concurrency, the micro-batch sweep, the splits, TTFT."""
    one, two, pp2 = res["pp=1, 1 thread"], res["pp=1, 2 threads"], res["pp=2, 1 thread / stage"]
    lines = ["| Concurrent sequences | pp=1, 1 thread tok/s | pp=1, 2 threads tok/s | pp=2 tok/s "
             "| pp=2 / pp=1 (1 thread) | pp=2 busy, stage 0 / 1 |", "|---:|---:|---:|---:|---:|---:|"]
    for n in CONCURRENCY:
        a, b, c = (r["throughput"][str(n)] for r in (one, two, pp2))
        lines.append(f"| {n} | {a['tps']:.1f} | {b['tps']:.1f} | {c['tps']:.1f} "
                     f"| {c['tps'] / a['tps']:.2f}x | {pct(c['busy'])} |")
    lines += ["", "| pp=2, 8 sequences: micro-batches | tok/s | busy, stage 0 / 1 |", "|---:|---:|---:|"]
    lines += [f"| {m} | {v['tps']:.1f} | {pct(v['busy'])} |" for m, v in pp2["micro_batches"].items()]
    lines += ["", "| pp=2, 8 sequences: stage split | layers | tok/s | busy, stage 0 / 1 |",
              "|---|---|---:|---:|"]
    for name in ("pp=2, 1 thread / stage", "pp=2, even split", "pp=2, measured split"):
        r = res[name]
        sizes = "+".join(str(b - a) for a, b in r["layers"])
        label = {"pp=2, 1 thread / stage": "cost estimate (default)"}.get(name, name.split(", ")[1])
        eight = r["throughput"]["8"]
        lines.append(f"| {label} | {sizes} | {eight['tps']:.1f} | {pct(eight['busy'])} |")
    lines += ["", f"| TTFT, one {args.long}-token prompt | ms | vs pp=1 (1 thread) | busy, stage 0 / 1 |",
              "|---|---:|---:|---:|"]
    base = one["ttft"]["0"]["ttft"]
    rows = [("pp=1, 1 thread", one["ttft"]["0"]), ("pp=1, 2 threads", two["ttft"]["0"])]
    rows += [(f"pp=2, {c} chunks" if c != "1" else "pp=2, 1 chunk (no token-level pipelining)", v)
             for c, v in pp2["ttft"].items()]
    lines += [f"| {name} | {v['ttft'] * 1e3:.0f} | {v['ttft'] / base:.2f}x | {pct(v['busy'])} |"
              for name, v in rows]
    lines += ["", f"| Chunk rule, one {args.long}-token prefill in one process | chunk sizes (tokens) "
              "| seconds per chunk | slowest / fastest |", "|---|---|---|---:|"]
    for rule, v in res["costs"]["chunk_rule"].items():
        secs = v["seconds"]
        lines.append(f"| {rule} | {', '.join(map(str, v['sizes']))} | {', '.join(f'{x:.2f}' for x in secs)} "
                     f"| {max(secs) / min(secs):.2f} |")
    others = [x["other"] for r in res.values() if isinstance(r, dict)
              for part in ("throughput", "micro_batches", "ttft") for x in r.get(part, {}).values()]
    if others:
        lines += ["", f"CPU share taken by other processes during the reported runs: median "
                      f"{common.median(others):.0%}, max {max(others):.0%}."]
    return "\n".join(lines)


def chart(res: dict[str, dict], png: Path, long: int) -> None:
    """Timelines of both pp=2 ranks (8 sequences; the chunked prompt) and the busy fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"compute": "#2e7d32", "send": "#1565c0", "recv": "#f9a825", "idle": "#bdbdbd"}
    pp2 = res["pp=2, 1 thread / stage"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [1, 1, 1.2]})
    panels = ((axes[0], "timeline", "8 sequences in 2 micro-batches: prefill, then decode"),
              (axes[1], "prefill_timeline", f"one {long}-token prompt in {TRACE_CHUNKS} chunks"))
    for ax, key, title in panels:
        reps = pp2[key]
        horizon = max(r["timeline"]["totals"]["wall"] for r in reps)
        for row, rep in enumerate(reps):
            for name in colors:
                bars = [(s, d) for n, s, d, _ in rep["timeline"]["spans"] if n == name and s < horizon]
                ax.broken_barh(bars, (row - 0.4, 0.8), color=colors[name], label=name if row == 0 else None)
        ax.set_yticks(range(len(reps)), [f"rank {r['rank']}, layers {r['layers'][0]}..{r['layers'][1] - 1}"
                                         for r in reps])
        ax.set_xlim(0, horizon)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds")
    axes[0].legend(ncol=4, fontsize=8, loc="upper right")
    ms = list(pp2["micro_batches"])
    for stage in range(2):
        axes[2].plot([int(m) for m in ms], [pp2["micro_batches"][m]["busy"][stage] for m in ms], "o-",
                     label=f"stage {stage} busy")
    axes[2].axhline(0.75, color="grey", ls="--", lw=1, label="75% target")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks([int(m) for m in ms], ms)
    axes[2].set_ylim(0, 1)
    axes[2].set_xlabel("micro-batches (8 sequences)")
    axes[2].set_title("busy fraction per stage (1 - busy = bubble + transfers)", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"meshlm pp=2, fp32 {pp2.get('model', '')} on {common.machine()}", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def main() -> None:
    """Run every layout in its own process, print the tables, write the chart."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-100m", choices=list(common.MODELS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--long", type=int, default=2000, help="prompt tokens for the TTFT comparison")
    ap.add_argument("--wait", type=float, default=90.0, help="max seconds to wait for other load to stop")
    ap.add_argument("--png", type=Path, default=Path("docs/img/pipeline_cpu.png"))
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from meshlm.parallel.launch import die_with_parent

        die_with_parent()
        print(json.dumps(measure(json.loads(args.child))))
        return
    t0 = time.time()
    common.random_llama(args.model)
    base = {"model": args.model, "runs": args.runs, "new": args.new, "long": args.long,
            "concurrency": CONCURRENCY, "wait": args.wait}
    with common.quiet_run(args.wait):
        costs = run_child({**base, "layout": "pp=1 hooks", "pp": 1, "threads": 1, "costs_only": True})
    jobs = [{**base, "layout": "pp=1, 1 thread", "pp": 1, "threads": 1},
            {**base, "layout": "pp=1, 2 threads", "pp": 1, "threads": 2},
            {**base, "layout": "pp=2, 1 thread / stage", "pp": 2, "threads": 1,
             "micro_batches": MICRO_BATCHES, "chunks": CHUNKS},
            {**base, "layout": "pp=2, even split", "pp": 2, "threads": 1, "concurrency": (8,),
             "ttft": False, "layers": [common.MODELS[args.model]["num_hidden_layers"] // 2] * 2},
            {**base, "layout": "pp=2, measured split", "pp": 2, "threads": 1, "concurrency": (8,),
             "ttft": False, "costs": costs["costs"]}]
    res = {j["layout"]: {**run_child(j), "model": args.model} for j in jobs}
    res["costs"] = costs
    if args.json:
        args.json.write_text(json.dumps(res))
    chart(res, args.png, args.long)
    print(f"Machine: {common.machine()}; model {args.model} fp32, {SHORT}-token prompts, {args.new} new "
          f"tokens each, median of {args.runs}\n")
    print(tables(json.loads(json.dumps(res)), args))
    common.log(f"done in {time.time() - t0:.0f}s; chart in {args.png}")


if __name__ == "__main__":
    main()
