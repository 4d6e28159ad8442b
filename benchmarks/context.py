"""Context parallelism on one CPU host: cp=2 (pass-KV, pass-Q, auto) against cp=1 in the same run.

    python benchmarks/context.py [--models default,llama-200m-32k] [--lengths 4096,8192,16384] [--runs 2]
                                 [--new 32] [--kv-mb 64] [--json out.json] [--smoke]

(a) TTFT: one prompt of each length, max_tokens=1, prefilled in one engine step (max_num_batched_tokens =
    the length), fresh tokens every run (no prefix hit); cp=1 on one thread, cp=1 on two threads (the two
    cores cp=2 uses), cp=2 with the ring forced to pass-KV, to pass-Q, and chosen (auto). Median of --runs.
(b) Overlap: of the pass-KV runs, the share of the ring transfer hidden under attention: 1 - (seconds rank 0
    waited on ring hops) / (hops x latency + bytes / bandwidth, from the link figures measured at start).
(c) Decode: TPOT of --new tokens after a 2048-token prompt, KV sharded (cp=2) against unsharded (cp=1).
(d) Capacity: the longest prompt (+ --new) each layout serves with a per-rank KV pool of --kv-mb MiB, and a
    run of a prompt that cp=1 refuses and cp=2 serves.
(e) The arithmetic: what cp=2 would take with a core per rank, from cp=1's one-thread TTFT, the attention's
    share of it and the exposed ring time, against what two ranks sharing this host's cores measure.
--smoke: the default model and a tiny random Llama, short prompts, one run; checks the script, not figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common
import torch

QUIET = {"wait_s": 60.0}  # quiet_run's wait for an idle machine before each timed run (0 under --smoke)

BIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
           num_attention_heads=16, num_key_value_heads=8)  # ~200M parameters, a 32k context: a 16k prompt in ~2 min
TINY = dict(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2)


def long_llama(name: str, shape: dict) -> Path:
    """A random Llama of `shape` with a 32k context, built once into the benchmark cache (seeded weights)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = common.CACHE / name
    if (path / "DONE").exists():
        return path
    common.log(f"building {name} in {path}")
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**shape, max_position_embeddings=32768, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=False, dtype="float32")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    weights = {}
    for n in sorted(shapes):
        w = torch.randn(shapes[n], generator=g)
        weights[n] = 1.0 + 0.1 * w if n.endswith("norm.weight") else common.WEIGHT_STD * w
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(path))
    common._write_tokenizer(path, cfg.vocab_size)
    (path / "DONE").write_text("ok\n")
    return path


def open_llm(model: str | None, cp: int, threads: int, longest: int, kv_mb: float | None = None):
    """An LLM at cp ranks whose one engine step holds a whole `longest`-token prompt."""
    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig
    from meshlm.engine.scheduler import SchedulerConfig

    engine = EngineConfig(kv_cache_mb=kv_mb, scheduler=SchedulerConfig(max_num_batched_tokens=max(longest, 2048)))
    return LLM(model, dtype="float32", cp=cp, threads=threads, progress=False, engine=engine, comm_timeout_s=600)


def ttft(llm, n: int, runs: int, seed: int) -> float:
    """Median TTFT (s) of a fresh n-token prompt, max_tokens=1."""
    from meshlm import SamplingParams

    out = []
    for r in range(runs):
        p = common.prompt_ids(n, llm.cfg.vocab_size, seed=seed * 1000 + r)
        with common.quiet_run(**QUIET):
            out.append(llm.generate([p], SamplingParams(max_tokens=1, ignore_eos=True))[0].ttft_s)
    return statistics.median(out)


def hidden_share(llm) -> float | None:
    """Share of the pass-KV ring's transfer time hidden under compute on rank 0 (None without ring hops)."""
    link = llm.executor.worker.runner.cache.link
    st = llm.comm_stats()[0].get("cp/ring_kv")
    if not st or not st["calls"]:
        return None
    transfer = st["calls"] * link.latency_s + st["bytes"] / link.bandwidth_bytes_per_s
    return max(0.0, 1.0 - st["seconds"] / transfer)


def tpot(llm, prompt_len: int, new: int) -> float:
    """Seconds per output token after a prompt_len-token prompt."""
    from meshlm import SamplingParams

    p = common.prompt_ids(prompt_len, llm.cfg.vocab_size, seed=7)
    with common.quiet_run(**QUIET):
        o = llm.generate([p], SamplingParams(max_tokens=new, ignore_eos=True))[0]
    return o.decode_s / max(1, len(o.token_ids) - 1)


def bench_model(name: str, model: str | None, lengths: list[int], runs: int, new: int, kv_mb: float,
                decode_prompt: int) -> dict:
    """Every figure of one model."""
    from meshlm.errors import RequestError

    res: dict = {"model": name, "ttft": {}, "hidden": {}, "choice": {}}
    longest = max(lengths)
    for label, cp, threads in (("cp=1 (1 thread)", 1, 1), ("cp=1 (2 threads)", 1, 2), ("cp=2", 2, 1)):
        common.log(f"{name}: {label}")
        with open_llm(model, cp, threads, longest) as llm:
            fits = [n for n in lengths if n < llm.max_context]
            rings = ("pass-kv", "pass-q", "auto") if cp > 1 else (None,)
            for ring in rings:
                key = label if ring is None else f"cp=2 {ring}"
                if ring:
                    llm.executor.call("set_cp_ring", ring)
                llm.executor.call("reset_stats")
                seed = 10 * len(res["ttft"])  # fresh prompts per layout and ring: no prefix-cache hit
                res["ttft"][key] = {n: ttft(llm, n, runs, seed=seed + n) for n in fits}
                if ring == "pass-kv":
                    res["hidden"][key] = hidden_share(llm)
                if ring == "auto":
                    res["choice"] = llm.executor.call_all("cp_ring_choices")[0]
            if threads == 1:
                res.setdefault("tpot", {})[label] = tpot(llm, min(decode_prompt, llm.max_context - new - 1), new)
            if cp > 1:
                res["link"] = vars(llm.executor.worker.runner.cache.link)
    for cp in (1, 2):  # (d) capacity at a fixed per-rank KV pool
        with open_llm(model, cp, 1, 2048, kv_mb=kv_mb) as llm:
            cap = min(llm.engine.capacity_tokens, llm.max_context) - new
            res.setdefault("capacity", {})[f"cp={cp}"] = cap
    one, two = res["capacity"]["cp=1"], res["capacity"]["cp=2"]
    if two > one:
        from meshlm import SamplingParams

        p = common.prompt_ids(min(two, 2 * one) - 1, 2000, seed=3)  # every model here has >= 2000 tokens
        with open_llm(model, 1, 1, 2048, kv_mb=kv_mb) as llm:
            try:
                llm.generate([p], SamplingParams(max_tokens=new, ignore_eos=True))
                res["refused_at_cp1"] = False
            except RequestError:
                res["refused_at_cp1"] = True
        with open_llm(model, 2, 1, 2048, kv_mb=kv_mb) as llm:
            o = llm.generate([p], SamplingParams(max_tokens=new, ignore_eos=True))[0]
            res["served_at_cp2"] = len(o.token_ids) == new
        res["capacity_prompt"] = len(p)
    return res


def report(res: dict, lengths: list[int]) -> str:
    """Markdown tables and the arithmetic for one model."""
    lines = [f"### {res['model']}", "", "| layout | " + " | ".join(f"TTFT {n}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for key, row in res["ttft"].items():
        lines.append(f"| {key} | " + " | ".join(f"{row[n] * 1e3:.0f} ms" if n in row else "-" for n in lengths)
                     + " |")
    link = res.get("link", {})
    lines += ["", f"auto chose: {res.get('choice')}; link: latency {link.get('latency_s', 0) * 1e6:.0f} us, "
              f"bandwidth {link.get('bandwidth_bytes_per_s', 0) / 1e9:.2f} GB/s, attention "
              f"{link.get('attention_flops_per_s', 0) / 1e9:.1f} GFLOP/s"]
    for key, h in res["hidden"].items():
        lines.append(f"ring transfer hidden under compute ({key}): " + ("n/a" if h is None else f"{h:.0%}"))
    t = res.get("tpot", {})
    lines.append("decode TPOT: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()))
    cap = res["capacity"]
    served = (f"; a {res['capacity_prompt']}-token prompt refused at cp=1: {res.get('refused_at_cp1')}, "
              f"served at cp=2: {res.get('served_at_cp2')}") if "capacity_prompt" in res else ""
    lines.append("largest prompt at the fixed per-rank KV pool: "
                 + ", ".join(f"{k} {v:,} tokens" for k, v in cap.items()) + served)
    one = res["ttft"].get("cp=1 (1 thread)", {})
    kv = res["ttft"].get("cp=2 pass-kv", {})
    for n in lengths:
        if n in one and n in kv:
            own_cores = one[n] / 2  # each rank computes half of every layer's tokens and half the attention pairs
            lines.append(f"arithmetic {n}: cp=1 one thread {one[n] * 1e3:.0f} ms; with a core per rank cp=2 would "
                         f"take about {own_cores * 1e3:.0f} ms + exposed ring; measured {kv[n] * 1e3:.0f} ms with "
                         f"both ranks on this host's {os.cpu_count()} cores shared with everything else "
                         f"({kv[n] / own_cores:.2f}x the prediction)")
    return "\n".join(lines)


def main() -> int:
    """Run every model's figures; print the tables (stdout), optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,llama-200m-32k")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--kv-mb", type=float, default=64.0)
    ap.add_argument("--decode-prompt", type=int, default=2048)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.lengths, args.runs, args.new, args.kv_mb, args.decode_prompt = \
            "default,llama-tiny-32k", "256,512", 1, 4, 2.0, 128
        QUIET["wait_s"] = 0.0
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"machine: {common.machine()}\n")
    out = []
    for name in args.models.split(","):
        model = None if name == "default" else str(long_llama(name, TINY if "tiny" in name else BIG))
        t0 = time.time()
        res = bench_model(name, model, lengths, args.runs, args.new, args.kv_mb, args.decode_prompt)
        common.log(f"{name}: {time.time() - t0:.0f}s")
        print(report(res, lengths) + "\n")
        out.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
