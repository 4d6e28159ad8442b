"""The `meshlm plan` command and the `--dry-run` check of generate and serve (pure: no torch, no engine)."""

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
from meshlm.plan.weights import QUANTIZE, WeightFormat, gguf_format


def model_config(model: str | None) -> tuple[ModelConfig, str]:
    """Config and name of --model: a config.json, a HF folder, a .gguf, or None (the bundled SmolLM2)."""
    if model is None:
        from meshlm.checkpoint import open_checkpoint

        return open_checkpoint(None).cfg, "SmolLM2-135M-Instruct (bundled)"
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


def weight_format(model: str | None, dequantize: bool, quantize: str | None) -> WeightFormat:
    """How the engine will store --model's weights: --quantize's format; else a GGUF's kept formats (the
    bundled model is a Q4_1 GGUF) unless an explicit float dtype dequantizes it; else the compute dtype."""
    if quantize:
        return WeightFormat.quantized(quantize)
    if dequantize:
        return WeightFormat()
    if model is None:
        from meshlm.checkpoint.cache import default_gguf_path

        path = default_gguf_path()
    else:
        path = Path(model).expanduser()
    return gguf_format(path) if path.suffix.lower() == ".gguf" and path.is_file() else WeightFormat()


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
    p.add_argument("--expert-hit-rate", type=float, default=None, metavar="P",
                   help="MoE with an expert budget: share of expert uses found resident (default: the resident "
                        "share of the experts, as under uniform routing)")


def add_parser(sub: Any) -> None:
    """The `plan` subcommand."""
    p = sub.add_parser("plan", help="choose a dp x pp x tp layout for a model on a cluster, and explain it",
                       description="Enumerate dp x pp x tp over the cluster, reject what cannot work (heads, "
                                   "memory, links, SLO), rank the rest by the objective, and print each term "
                                   "of the cost equation. --calibrate measures this machine instead "
                                   "(meshlm/calibrate.py).")
    p.add_argument("--model", default=None,
                   help="config.json, Hugging Face folder or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--cluster", default=None,
                   help=f"preset ({', '.join(clusters.PRESETS)}), a JSON/YAML file, or local (default: this "
                        "machine's calibrated profile)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU hosts, bfloat16 otherwise); given with a .gguf "
                        "model, its weights are planned dequantized to it, as generate/serve --dtype do")
    p.add_argument("--quantize", default=None, choices=list(QUANTIZE),
                   help="plan the weights quantized at load: int8 (Q8_0, 34/32 bytes a weight), "
                        "int4 (Q4_0, 18/32), int4-min (Q4_1, 20/32). Default: a .gguf model's own formats "
                        "(the bundled SmolLM2: Q4_1 layers, Q8_0 embedding), else the dtype")
    _workload_args(p)
    p.add_argument("--redundant-experts", type=int, default=0, metavar="N",
                   help="MoE at ep > 1: size each rank for its balancer slots with N extra expert copies per group")
    p.add_argument("--expert-budget", type=int, default=0, metavar="BYTES",
                   help="MoE at tp = 1: plan with this many bytes of resident experts per rank (the rest read "
                        "from host memory per miss). Without it, a tp = 1 layout that fits only with a budget "
                        "is planned with the largest that fits")
    p.add_argument("--cp", type=int, default=1,
                   help="context-parallel degree of every layout (KV per rank / cp, the ring in the prefill "
                        "cost); the search then spans dp x pp x tp over the devices / cp (default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine (matmul rate and memory bandwidth per dtype, collective latency "
                        "and bandwidth over shm and gloo, per-layer overhead; about 20 s) and save it as "
                        "the local cluster file")
    p.add_argument("--quick", action="store_true", help="with --calibrate: shorter, rougher measurements")
    p.add_argument("--out", default=None,
                   help=f"with --calibrate: where to save (default {clusters.profile_path()})")


def workload_from(args: argparse.Namespace) -> Workload:
    """--workload, then the single-field flags on top."""
    from dataclasses import replace

    w = Workload.parse(args.workload)
    over = {"objective": args.objective, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "slo_ttft_s": args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None,
            "slo_tpot_s": args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None,
            "expert_hit_rate": getattr(args, "expert_hit_rate", None)}
    return replace(w, **{k: v for k, v in over.items() if v is not None})


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the chosen layout and its explanation."""
    from meshlm.plan.report import format_plan, plan_json
    from meshlm.plan.search import search

    cfg, name = model_config(args.model)
    c = clusters.resolve(args.cluster)
    dtype = args.dtype or ("float32" if c.node.shared_memory else "bfloat16")
    weights = weight_format(args.model, args.dtype is not None, args.quantize)
    plan = search(cfg, c, workload_from(args), dtype, name, weights, cp=args.cp,
                  redundant=args.redundant_experts, expert_budget=args.expert_budget)
    print(json.dumps(plan_json(plan), indent=1) if args.json else format_plan(plan, cfg, c))
    return 0 if plan.chosen is not None else 1


def cmd_dry_run(args: argparse.Namespace, kv_default: float) -> int:
    """Check generate's or serve's layout before any process starts; exit 1 with the fix when it fails.
    `kv_default`: the KV pool per rank (bytes) the engine would size without --kv-cache-mb."""
    from meshlm.plan.report import dry_run

    cfg, _ = model_config(args.model)
    c = clusters.resolve("local")
    layout = Layout(1, getattr(args, "pp", 1) or 1, args.tp, ep=getattr(args, "ep", 1) or 1,
                    cp=getattr(args, "cp", 1) or 1, redundant=getattr(args, "redundant_experts", 0) or 0,
                    expert_budget=getattr(args, "expert_budget", None) or 0)
    context = min(args.max_context or cfg.max_position, cfg.max_position)
    if args.command == "generate":
        prompt = max(1, len(args.prompt) // 3)  # ~3 characters a token; the tokenizer is not loaded
        work = Workload(prompt_tokens=min(prompt, context - 1), output_tokens=max(1, min(args.max_tokens,
                        context - min(prompt, context - 1))), batch=1)
    else:
        work = Workload(prompt_tokens=max(1, context - 1), output_tokens=1, batch=1)
    kv_mb = getattr(args, "kv_cache_mb", None)
    dtype = "float32" if args.dtype == "auto" else args.dtype  # auto: the file's formats, float32 compute
    weights = weight_format(args.model, args.dtype != "auto", getattr(args, "quantize", None))
    ok, text = dry_run(cfg, layout, c, work, dtype, kv_mb * 2**20 if kv_mb else kv_default, weights)
    print(text, file=sys.stdout)
    return 0 if ok else 1
