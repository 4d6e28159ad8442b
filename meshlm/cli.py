"""Command line: meshlm generate | serve | plan | bench."""

from __future__ import annotations

import argparse
import logging
import sys

from meshlm.bench import add_parser as add_bench_parser
from meshlm.bench import cmd_bench
from meshlm.errors import MeshlmError
from meshlm.kernels.qformat import QUANTIZE
from meshlm.plan.cli import add_parser as add_plan_parser
from meshlm.plan.cli import cmd_dry_run, cmd_plan
from meshlm.serve.cli import add_parser as add_serve_parser
from meshlm.serve.cli import cmd_serve


def _layer_counts(text: str) -> tuple[int, ...]:
    """'16,14' -> (16, 14)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer counts like 16,14, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face folder (config.json + *.safetensors) or .gguf file "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): a GGUF's Q8_0/Q4_0/Q4_1 weights run as stored (other quantized types "
                        "convert to those), everything else in float32; a dtype: every weight dequantized to it")
    p.add_argument("--quantize", default=None, choices=list(QUANTIZE),
                   help="quantize a float model's linear and embedding weights at load: int8 (Q8_0), int4 "
                        "(Q4_0), int4-min (Q4_1); blocks of 32, activations in --dtype")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per process (default: this host's cores shared evenly among its ranks, "
                        "measured fastest here; env MESHLM_THREADS)")
    p.add_argument("--max-context", type=int, default=None,
                   help="context window in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks; meshlm starts them on this machine itself (default 1). "
                        "Heads need not divide by tp.")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages: contiguous layers each, the embedding on the first, the norm and "
                        "head on the last; meshlm starts pp x tp ranks, tp ranks adjacent (default 1)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallelism for MoE models: the stage's tp ranks hold whole experts (ep must equal "
                        "tp; --ep N alone implies --tp N), tokens move to them by all-to-all (default 1: each "
                        "expert split over the tp ranks)")
    p.add_argument("--expert-capacity", type=float, default=None, metavar="FACTOR",
                   help="with --ep: an expert takes at most ceil(FACTOR x routed tokens / experts) per step, the "
                        "rest are dropped and counted (default: dropless)")
    p.add_argument("--cp", type=int, default=1,
                   help="context-parallel ranks: a prompt's tokens split across them (ring attention) and the KV "
                        "cache sharded round-robin by token, so a context cp times longer fits; combines with "
                        "--tp (cp x tp ranks) and --pp (each stage its own cp ranks; default 1)")
    p.add_argument("--cp-ring", default="auto", choices=["auto", "pass-kv", "pass-q"],
                   help="the prefill ring at --cp > 1: auto (default) chooses per prefill from the new and cached "
                        "tokens, the head counts and the measured link (docs/context_parallel.md)")
    p.add_argument("--redundant-experts", type=int, default=0, metavar="N",
                   help="with --ep: N extra expert copies the balancer places (hottest experts replicated, each rank "
                        "holding up to ceil(E/ep) + ceil(N/ep) experts; default 0)")
    p.add_argument("--eplb-interval", type=int, default=0, metavar="STEPS",
                   help="with --ep: rebalance experts every STEPS engine steps from the last 64 steps' routing "
                        "(default 0: never)")
    p.add_argument("--expert-budget", type=int, default=None, metavar="BYTES",
                   help="MoE at tp 1: keep at most BYTES of experts resident, read the rest from the memory-mapped "
                        "checkpoint on demand (frequency-aware, next layer prefetched; default: all resident)")
    p.add_argument("--pp-layers", type=_layer_counts, default=None, metavar="N,N,...",
                   help="layers per pipeline stage, e.g. 16,14 (default: balanced by an estimated cost)")
    p.add_argument("--comm-timeout", type=float, default=60.0,
                   help="seconds a collective may wait for a peer before the launch fails (default 60); ranks "
                        "may start up to max(this, 60 s) apart")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where the ranks compute: cuda puts rank r on GPU r of its host (default auto: cuda when "
                        "a GPU is visible, else cpu; env MESHLM_DEVICE)")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="torch.distributed backend for tensors between ranks (default: gloo on CPU, nccl on CUDA)")
    p.add_argument("--transport", default=None, choices=["auto", "shm", "gloo"],
                   help="collectives between ranks on this machine: shared memory or gloo (default auto: "
                        "shm for CPU ranks on one host, else gloo; env MESHLM_TRANSPORT)")
    add_speculative_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the layout (heads, memory, KV capacity against the longest request) on this "
                        "machine's profile and say what to change; start no process, load no weights")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    """--speculative, --num-speculative-tokens and --speculative-policy (generate, serve, bench)."""
    p.add_argument("--speculative", default=None, metavar="ngram|draft:PATH|self-int4",
                   help="speculative decoding: propose tokens by n-gram lookup in the prompt and output, by a "
                        "draft checkpoint with the same tokenizer, or by this model quantized to int4; the target "
                        "verifies them in one step, outputs stay exact (default off; docs/speculative.md)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="tokens proposed per request per step at most (default 4)")
    p.add_argument("--speculative-policy", default="auto", choices=["auto", "always"],
                   help="auto (default): speculate only while the measured step cost and acceptance say it "
                        "raises tokens/s (off at large batch); always: propose K tokens every step")


def speculative_config(args: argparse.Namespace):
    """The SpeculativeConfig the flags ask for, or None (raises ConfigError on a bad value)."""
    from meshlm.engine.speculative import SpeculativeConfig

    if getattr(args, "speculative", None) is None:
        return None
    return SpeculativeConfig(args.speculative, args.num_speculative_tokens, args.speculative_policy == "auto")


def spec_figures(stats) -> str:
    """' | spec: acceptance 62% | mean accepted length 2.40 | per position 80/60/45/30%' or ''."""
    c = stats.speculative
    if c is None:
        return ""
    per = "/".join(f"{100 * x:.0f}" for x in c.per_position()) or "-"
    return (f" | spec: {c.drafts} drafts, acceptance {100 * c.acceptance_rate:.0f}% | mean accepted length "
            f"{c.mean_accepted_length:.2f} | per position {per}%")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every command."""
    parser = argparse.ArgumentParser(
        prog="meshlm", description="Run one large language model across many devices and machines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt, streaming to the terminal",
                       description="Generate text from a prompt and stream it to the terminal; ends with a "
                                   "line of figures (prompt tokens, generated tokens, TTFT, decode tokens/s).")
    g.add_argument("prompt", help="the prompt text")
    _add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--prefill-chunks", type=int, default=None, metavar="N",
                   help="with --pp: cut the prompt into N chunks of equal estimated cost that flow through the "
                        "stages one after another (token-level pipelining); 1 = off (default: about 4 x pp "
                        "chunks of at least 128 tokens)")
    g.add_argument("--trace", default=None, metavar="OUT.json",
                   help="with --pp: write a Chrome trace of every rank's compute, transfers and idle time "
                        "(open it in ui.perfetto.dev)")
    add_serve_parser(sub, _add_model_args)
    add_plan_parser(sub)
    add_bench_parser(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout and print its figures to stderr."""
    from meshlm.config import SamplingParams
    from meshlm.errors import ConfigError
    from meshlm.llm import LLM
    from meshlm.parallel.pipeline import PipelineSpec

    if (args.trace or args.prefill_chunks) and args.pp == 1:
        raise ConfigError("--trace and --prefill-chunks describe a pipeline; add --pp 2 (or more).")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    with LLM(args.model, dtype=args.dtype, quantize=args.quantize, threads=args.threads,
             max_context=args.max_context, tp=args.tp, ep=args.ep, expert_capacity=args.expert_capacity,
             cp=args.cp, cp_ring=args.cp_ring,
             redundant_experts=args.redundant_experts, eplb_interval=args.eplb_interval,
             expert_budget=args.expert_budget,
             comm_timeout_s=args.comm_timeout, backend=args.backend, transport=args.transport, pp=args.pp,
             device=args.device,
             pp_layers=args.pp_layers, pipeline=PipelineSpec(prefill_chunks=args.prefill_chunks),
             speculative=speculative_config(args)) as llm:
        if args.pp > 1:
            llm.start_timeline(spans=bool(args.trace))
        out = None
        if not args.chat:
            sys.stdout.write(args.prompt)
        for delta, last in llm.stream(args.prompt, params, chat=args.chat):
            sys.stdout.write(delta)
            sys.stdout.flush()
            out = last
        sys.stdout.write("\n")
        assert out is not None
        print(f"[prompt {len(out.prompt_token_ids)} tokens | generated {len(out.token_ids)} tokens | "
              f"TTFT {out.ttft_s * 1000:.1f} ms | decode {out.decode_tokens_per_s:.1f} tok/s | "
              f"finish {out.finish_reason} | threads {llm.threads} | {args.dtype} | tp {llm.dims.tp} "
              + (f"| ep {llm.dims.ep} " if llm.dims.ep > 1 else "") + (f"| cp {args.cp} " if args.cp > 1 else "")
              + f"| pp {args.pp}{spec_figures(llm.engine.stats())}]",
              file=sys.stderr)
        if llm.dims.tp > 1 or args.pp == 1:  # with pp > 1 the stage lines below give each rank's memory
            _print_ranks(llm, out.ttft_s + out.decode_s)
        if args.pp > 1:
            _print_stages(llm, args.trace)
    return 0


def _print_stages(llm, trace: str | None) -> None:
    """One line per rank of the pipeline: layers, compute / send / recv / idle, bubble, memory; the trace."""
    from meshlm.telemetry.trace import summary_line, write_chrome_trace

    reports = llm.stage_reports()
    for rep in reports:
        print("  " + summary_line(rep), file=sys.stderr)
    if trace:
        path = write_chrome_trace(trace, reports)
        print(f"  trace: {path} (open in https://ui.perfetto.dev)", file=sys.stderr)


def _print_ranks(llm, wall_s: float) -> None:
    """One line per rank: heads owned (uneven splits show here), weights, memory, collective time."""
    stats = llm.comm_stats()
    for info, st in zip(llm.rank_info(), stats):
        comm_s = sum(v["seconds"] for k, v in st.items() if k.startswith(("tp/", "cp/")))
        comm = (f" | collectives {comm_s * 1000:.0f} ms over {info.get('transport', '?')} "
                f"({100 * comm_s / max(wall_s, 1e-9):.0f}% of generation)") if len(stats) > 1 else ""
        formats = ", ".join(f"{k} {v:.0f}" for k, v in info.get("weight_mb_by_format", {}).items())
        print(f"  rank {info['rank']}: {info['q_heads']} q heads / {info['kv_heads']} kv heads | "
              f"weights {info['weight_mb']:.0f} MB ({formats}) | peak RSS {info['peak_rss_mb']:.0f} MB | "
              f"{info['device']}{comm}", file=sys.stderr)


def cmd_plan_or_calibrate(args: argparse.Namespace) -> int:
    """`meshlm plan`, or with --calibrate the measurement of this host (meshlm/calibrate.py)."""
    if args.calibrate:
        from meshlm.calibrate import cmd_calibrate

        return cmd_calibrate(args)
    return cmd_plan(args)


def cmd_check(args: argparse.Namespace) -> int:
    """--dry-run of generate or serve: the planner's check against the KV pool the engine would size."""
    from meshlm.engine.engine import EngineConfig, host_kv_budget_bytes

    world = max(args.tp, getattr(args, "ep", 1) or 1) * (getattr(args, "pp", 1) or 1) * (getattr(args, "cp", 1) or 1)
    return cmd_dry_run(args, host_kv_budget_bytes(EngineConfig().kv_cache_fraction, world))


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "plan": cmd_plan_or_calibrate, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point: clear one-paragraph errors for user mistakes, tracebacks only for bugs."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if getattr(args, "dry_run", False):
            return cmd_check(args)
        return COMMANDS[args.command](args)
    except MeshlmError as e:
        print(f"meshlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
