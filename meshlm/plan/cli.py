"""The `meshlm plan` and `meshlm bench` commands and the `--dry-run` check of generate and serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from meshlm.config import ModelConfig
from meshlm.errors import ConfigError
from meshlm.plan import cluster as clusters
from meshlm.plan.layout import OBJECTIVES, Layout, Workload


def model_config(model: str | None) -> tuple[ModelConfig, str]:
    """Config and name of --model: a config.json, a HF folder, a .gguf, or None (the bundled SmolLM2)."""
    if model is None:
        from meshlm.checkpoint import open_checkpoint

        return open_checkpoint(None, progress=False).cfg, "SmolLM2-135M-Instruct (bundled)"
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix.lower() == ".gguf" and path.exists():
        from meshlm.checkpoint.gguf import GGUFSource

        return ModelConfig.from_hf(GGUFSource(path).config), path.stem
    if not path.exists():
        raise ConfigError(f"--model {model!r}: no such config.json, folder or .gguf file. Pass a Hugging "
                          "Face folder, its config.json (weights are not needed to plan), or a .gguf file.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}).") from None
    name = raw.get("_name_or_path") or (path.parent.name if path.name == "config.json" else path.stem)
    return ModelConfig.from_hf(raw), str(name)


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default=None, metavar="W",
                   help="JSON/YAML file, or inline: prompt=2048,output=256,batch=16,objective=ttft,"
                        "slo_tpot_ms=50")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="rank layouts by throughput per device (default), TTFT or TPOT")
    p.add_argument("--batch", type=int, default=None, help="sequences decoded together per replica")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length of a request")
    p.add_argument("--output-tokens", type=int, default=None, help="tokens generated per request")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="reject layouts slower than this to the first token")
    p.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="reject layouts slower than this per output token")


def add_parsers(sub: Any) -> None:
    """The `plan` and `bench` subcommands."""
    p = sub.add_parser("plan", help="choose a dp x pp x tp layout for a model on a cluster, and explain it",
                       description="Enumerate dp x pp x tp over the cluster, reject what cannot work (heads, "
                                   "memory, links, SLO), rank the rest by the objective, and print each term "
                                   "of the cost equation. --calibrate measures this machine instead.")
    p.add_argument("--model", default=None,
                   help="config.json, Hugging Face folder or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--cluster", default=None,
                   help=f"preset ({', '.join(clusters.PRESETS)}), a JSON/YAML file, or local (default: this "
                        "machine's calibrated profile)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight and compute dtype (default: float32 on CPU hosts, bfloat16 otherwise)")
    _workload_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine (matmul rate, memory bandwidth, collective alpha/beta) and "
                        "save its profile")
    p.add_argument("--quick", action="store_true", help="with --calibrate: short, rough measurements")
    p.add_argument("--threads", type=int, default=1, help="with --calibrate: threads per rank (default 1)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="with --calibrate: two rounds of a rate must agree within this (default 0.05)")
    p.add_argument("--max-load", type=float, default=0.2,
                   help="with --calibrate: refuse to save when other processes used more than this share "
                        "of the CPUs meanwhile (default 0.2)")
    p.add_argument("--out", default=None,
                   help=f"with --calibrate: where to save (default {clusters.profile_path()})")

    b = sub.add_parser("bench", help="run a layout and print predicted against measured for each term",
                       description="Run a layout through meshlm.LLM (fixed prompt and decode lengths) and "
                                   "compare each term of the cost model (compute, collectives, control, "
                                   "transfers, bubble) with what the ranks measured.")
    b.add_argument("--layout", action="append", required=True, metavar="tp=2,pp=1",
                   help="layout to run (repeatable)")
    b.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2-135M)")
    b.add_argument("--cluster", default=None, help="profile to predict with (default: local)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    b.add_argument("--transport", default=None, choices=["auto", "shm", "gloo"],
                   help="the tp collectives' transport (default auto)")
    b.add_argument("--prompt-tokens", type=int, default=256, help="prefill run's prompt (default 256)")
    b.add_argument("--new-tokens", type=int, default=32, help="decode run's tokens (default 32)")
    b.add_argument("--batch", type=int, default=1, help="decode run's sequences (default 1)")
    b.add_argument("--runs", type=int, default=3, help="timed runs per phase; medians (default 3)")
    b.add_argument("--no-rescale", action="store_true",
                   help="predict from the profile as calibrated; by default a short reading of the host "
                        "(GEMV bandwidth, matmul rate) beside the runs scales the profile's bandwidths and "
                        "matmul rates by now / at calibration (meshlm/plan/host.py)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")


def workload_from(args: argparse.Namespace) -> Workload:
    """--workload, then the single-field flags on top."""
    from dataclasses import replace

    w = Workload.parse(args.workload)
    over = {"objective": args.objective, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "slo_ttft_s": args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None,
            "slo_tpot_s": args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None}
    return replace(w, **{k: v for k, v in over.items() if v is not None})


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the chosen layout and its explanation (or calibrate this machine)."""
    if args.calibrate:
        from meshlm.plan.calibrate import calibrate

        c = calibrate(threads=args.threads, quick=args.quick, tol=args.tolerance, max_load=args.max_load)
        path = clusters.save(c, args.out or clusters.profile_path())
        print(json.dumps(clusters.to_dict(c), indent=1) if args.json else _calibration_text(c, path))
        return 0
    from meshlm.plan.report import format_plan, plan_json
    from meshlm.plan.search import search

    cfg, name = model_config(args.model)
    c = clusters.resolve(args.cluster)
    dtype = args.dtype or ("float32" if c.node.shared_memory else "bfloat16")
    plan = search(cfg, c, workload_from(args), dtype, name)
    print(json.dumps(plan_json(plan), indent=1) if args.json else format_plan(plan, cfg, c))
    return 0 if plan.chosen is not None else 1


def _calibration_text(c: clusters.Cluster, path: Path) -> str:
    from meshlm.plan.fit import slow_text, wait_text

    d = c.node.device
    links = "; ".join(f"{ln.transport}: alpha {ln.latency * 1e6:.1f} us, beta {ln.bandwidth / 1e9:.2f} GB/s"
                      + wait_text(ln.waits) + slow_text(ln.slows)
                      + (f", hop {ln.hop * 1e6:.0f} us" if ln.hop else "") for ln in c.node.links)
    cap = f"{c.node.memory_bandwidth / 1e9:.1f} GB/s" if c.node.memory_bandwidth else "n/a"
    return (f"calibrated {c.node.devices} devices ({d.name}) in {c.notes.get('seconds')} s, saved to {path}\n"
            f"  matmul: {', '.join(f'{k} {v / 1e9:.1f} GFLOP/s' for k, v in d.flops.items())}\n"
            f"  memory bandwidth: {d.bandwidth / 1e9:.1f} GB/s per rank, node {cap}\n"
            f"  host reading (the probe a bench repeats to rescale): {_host_text(c)}\n"
            f"  attention: {d.attention_eff:.2f} x the matmul rate\n"
            f"  software overhead: {d.layer_overhead * 1e6:.0f} us per layer ("
            f"{d.pipeline_layer_overhead * 1e6:.0f} in a pipeline stage), {d.step_overhead * 1e6:.0f} us per "
            f"step\n  links: {links}\n  other processes used {c.notes.get('other_load', 0):.0%} of the CPUs "
            "meanwhile")


def _host_text(c: clusters.Cluster) -> str:
    from meshlm.plan.host import reference

    ref = reference(c)
    return "none" if ref is None else f"GEMV {ref.bandwidth / 1e9:.1f} GB/s, matmul {ref.matmul / 1e9:.1f} GFLOP/s"


def cmd_bench(args: argparse.Namespace) -> int:
    """Run each --layout and print predicted against measured."""
    from meshlm.plan.bench import format_bench, run_bench

    c = clusters.resolve(args.cluster)
    results = []
    for text in args.layout:
        res = run_bench(args.model, Layout.parse(text), c, args.prompt_tokens, args.new_tokens, args.batch,
                        args.threads, args.runs, args.dtype, args.transport,
                        rescale_to_host=not args.no_rescale)
        results.append(res)
        if not args.json:
            print(format_bench(res, c), flush=True)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=1))
    return 0


def cmd_dry_run(args: argparse.Namespace) -> int:
    """Check generate's or serve's layout before any process starts; exit 1 with the fix when it fails."""
    from meshlm.engine.engine import EngineConfig, available_memory_bytes
    from meshlm.plan.report import dry_run

    cfg, _ = model_config(args.model)
    c = clusters.resolve("local")
    layout = Layout(1, getattr(args, "pp", 1) or 1, args.tp)
    context = min(args.max_context or cfg.max_position, cfg.max_position)
    if args.command == "generate":
        prompt = max(1, len(args.prompt) // 3)  # ~3 characters a token; the tokenizer is not loaded
        work = Workload(prompt_tokens=min(prompt, context - 1), output_tokens=max(1, min(args.max_tokens,
                        context - min(prompt, context - 1))), batch=1)
    else:
        work = Workload(prompt_tokens=max(1, context - 1), output_tokens=1, batch=1)
    kv_mb = getattr(args, "kv_cache_mb", None)
    share = EngineConfig().kv_cache_fraction * available_memory_bytes() / layout.world  # the engine's default
    budget = kv_mb * 2**20 if kv_mb else share
    ok, text = dry_run(cfg, layout, c, work, args.dtype, budget)
    print(text, file=sys.stdout)
    return 0 if ok else 1
