"""Expert parallelism on one CPU host: ep=2 against tp=2 (each expert split) and ep=1, prefill and decode, and the
bytes the MoE layers move per decode step against the tokens routed, top-1 against top-2.

    python benchmarks/moe.py [--models upcycled moe-16x] [--runs 3] [--json F]
    python benchmarks/moe.py --smoke          # a tiny random MoE, one run: checks the script, times nothing

Models: "upcycled" is the bundled SmolLM2 upcycled into 4 experts, top-2 (python -m meshlm.upcycle, noise 0.01,
bf16 storage, run in float32); "moe-16x" a random Mixtral with 16 experts, top-2. Each also runs as top-1 (the
same weights, num_experts_per_tok 1). Prefill: one 256-token prompt, max_tokens=1, tokens/s = 256 / TTFT.
Decode: batch 1, a 16-token prompt then 64 new tokens; tokens/s = decode_tokens_per_s. MoE bytes per decode
step, per rank: the ranks' tp/all_to_all_v bytes over ep (ep), or rank 0's tp/all_reduce bytes minus attention's
(tp), over the steps; rows routed per step: the group's (token, expert) rows (expert_stats, counted before
dispatch). The planner's predicted TPOT for each
layout stands beside the measured one (meshlm.bench.predict on the local profile: run `meshlm plan --calibrate`
first, else it prices the cpu-host defaults, whose threads scale linearly and favour tp=1). Medians of --runs after a
warm-up, each under the benchmarks' lock (common.quiet_run). Markdown to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import common
import torch

LAYOUTS = ["tp=1", "tp=2", "ep=2"]
PREFILL, DECODE_PROMPT, NEW = 256, 16, 64
KV_MB = 64
RANDOM_MOE = {  # MixtralConfig keyword arguments
    "moe-16x": dict(vocab_size=8000, hidden_size=512, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2),
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2),
}


def random_moe(name: str) -> Path:
    """A random Mixtral of RANDOM_MOE[name] in the benchmark cache (built once)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = common.CACHE / name
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        cfg = MixtralConfig(**RANDOM_MOE[name], max_position_embeddings=4096, sliding_window=None,
                            bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
        MixtralForCausalLM(cfg).save_pretrained(str(path))
        common._write_tokenizer(path, cfg.vocab_size)
    return path


def upcycled() -> Path:
    """The bundled SmolLM2 upcycled into 4 experts, top-2 (built once)."""
    from meshlm.upcycle import upcycle

    path = common.CACHE / "smollm2-4x"
    if not (path / "config.json").exists():
        upcycle(path, experts=4, top_k=2, noise=0.01, dtype="bfloat16")
    return path


def with_top_k(path: Path, k: int) -> Path:
    """The same weights with num_experts_per_tok = k (a sibling folder of links)."""
    out = path.with_name(f"{path.name}-top{k}")
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():
            if f.name != "config.json" and not (out / f.name).exists():
                (out / f.name).symlink_to(f.resolve())
        cfg = json.loads((path / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": k}, indent=1))
    return out


def moe_bytes(ranks: list[dict], cfg, tokens: int, ep: bool) -> float:
    """Bytes a rank handed to the MoE layers' collectives: all-to-all-v (mean over ranks), or the all-reduces
    after the experts (rank 0's; every rank sends the same)."""
    stats = ranks[0]
    if "tp/all_reduce" not in stats:  # one rank: nothing moves
        return 0
    if ep:
        return sum(r.get("tp/all_to_all_v", {}).get("bytes", 0) for r in ranks) / len(ranks)
    ar = int(stats.get("tp/all_reduce", {}).get("bytes", 0))
    return ar - (cfg.num_layers + 1) * tokens * cfg.hidden_size * 4  # minus o_proj's and the embedding's


def run(model: Path, layout: str, runs: int, wait: float) -> dict:
    """Prefill and decode figures of one (model, layout)."""
    from meshlm import LLM, SamplingParams
    from meshlm.bench import predict
    from meshlm.engine.engine import EngineConfig
    from meshlm.plan import cluster as clusters
    from meshlm.plan.layout import Layout, Workload

    lay = Layout.parse(layout)
    with LLM(str(model), tp=lay.tp, ep=lay.ep, dtype="float32", progress=False,
             engine=EngineConfig(kv_cache_mb=KV_MB)) as llm:
        cfg, vocab = llm.cfg, llm.cfg.vocab_size
        llm.generate([common.prompt_ids(DECODE_PROMPT, vocab, 99)], SamplingParams(max_tokens=4, ignore_eos=True))
        pre, dec, moved, routed = [], [], [], []
        for r in range(runs):
            with common.quiet_run(wait):
                out = llm.generate([common.prompt_ids(PREFILL, vocab, r)], SamplingParams(max_tokens=1))[0]
            pre.append(PREFILL / out.ttft_s)
            llm.reset_comm_stats()
            with common.quiet_run(wait):
                out = llm.generate([common.prompt_ids(DECODE_PROMPT, vocab, 100 + r)],
                                   SamplingParams(max_tokens=NEW, ignore_eos=True))[0]
            dec.append(out.decode_tokens_per_s)
            steps = len(out.token_ids)  # the prompt pass and NEW - 1 decode steps, one token each after it
            tokens = DECODE_PROMPT + steps - 1
            moved.append(moe_bytes(llm.comm_stats(), cfg, tokens, lay.ep > 1) / steps)
            if lay.ep > 1:
                st = llm.expert_stats()[0]
                routed.append(sum(sum(v) for v in st["routed"].values()) / steps)
    work = Workload(prompt_tokens=DECODE_PROMPT, output_tokens=NEW, batch=1)
    pred = predict(cfg, lay, clusters.resolve(None), work, "float32", "auto")
    return {"model": model.name, "layout": layout, "top_k": cfg.num_experts_per_tok,
            "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "predicted_decode_tok_s": pred.tok_s, "moe_bytes_per_step": statistics.median(moved),
            "routed_per_step": statistics.median(routed) if routed else None}


def table(rows: list[dict]) -> str:
    """Markdown table of the results."""
    out = ["| model | top-k | layout | prefill tok/s | decode tok/s | planner decode tok/s | MoE bytes / step / rank "
           "| rows routed / step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        routed = f"{r['routed_per_step']:.1f}" if r["routed_per_step"] is not None else "-"
        out.append(f"| {r['model']} | {r['top_k']} | {r['layout']} | {r['prefill_tok_s']:.0f} | "
                   f"{r['decode_tok_s']:.1f} | {r['predicted_decode_tok_s']:.1f} | {r['moe_bytes_per_step']:.0f} "
                   f"| {routed} |")
    return "\n".join(out)


def main() -> int:
    """Run every (model, top-k, layout) and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["upcycled", "moe-16x"], choices=["upcycled", *RANDOM_MOE])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a quiet machine per run")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--smoke", action="store_true", help="a tiny random MoE, one run, no waiting")
    a = p.parse_args()
    if a.smoke:
        a.models, a.runs, a.wait = ["smoke"], 1, 0.0
    from meshlm.plan import cluster as clusters

    common.log(f"planner's cluster: {clusters.resolve(None).notes.get('source')}")
    rows = []
    for name in a.models:
        base = upcycled() if name == "upcycled" else random_moe(name)
        for k in (2, 1):
            model = with_top_k(base, k)
            for layout in LAYOUTS:
                common.log(f"{name} top-{k} {layout}")
                rows.append(run(model, layout, a.runs, a.wait))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
