"""`meshlm bench --layout tp=2 --layout pp=2`: run layouts on the engine path; the planner's prediction beside.

Each layout loads through meshlm.LLM (the engine that `generate` and `serve` run, continuous batching at
any pp) and serves one fixed workload per timed run: `batch` fresh random prompts of `prompt` tokens
arriving together (no prefix-cache hits), `new` tokens each, ignore_eos. Measured per run: TTFT = the
batch's last first token (arrival -> first token, RequestOutput.ttft_s), TPOT = the median over requests
of decode_s / (tokens - 1), decode tok/s = batch / TPOT; medians over `runs` after a warm-up. Predicted:
meshlm.plan.cost.estimate of the same workload on the cluster profile (default: this host's calibration),
with the tp group's transport.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from meshlm.plan import cluster as clusters
from meshlm.plan.cluster import Cluster
from meshlm.plan.cost import estimate
from meshlm.plan.layout import Layout, Workload

KV_MB = 256  # per rank: enough for the workloads here, no large allocation on a shared host


@dataclass(frozen=True)
class Figures:
    """A layout's TTFT and TPOT (seconds) and decode tokens/s for the workload."""

    ttft: float
    tpot: float
    tok_s: float


@dataclass
class BenchResult:
    """Predicted and measured figures of one layout over one transport, or why it was skipped."""

    layout: Layout
    transport: str  # the tp group's ("" when tp = 1)
    predicted: Figures | None = None
    measured: Figures | None = None
    skipped: str = ""
    runs: list[Figures] = field(default_factory=list)
    speculative: dict[str, Any] | None = None  # acceptance figures over the timed runs, with --speculative

    @property
    def name(self) -> str:
        """'pp=2 tp=2 (shm)'."""
        text = " ".join(f"{k}={getattr(self.layout, k)}" for k in ("dp", "pp", "tp", "ep")
                        if getattr(self.layout, k) > 1)
        return (text or "tp=1") + (f" ({self.transport})" if self.transport else "")

    def as_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"layout": asdict(self.layout), "name": self.name, "transport": self.transport,
                "predicted": asdict(self.predicted) if self.predicted else None,
                "measured": asdict(self.measured) if self.measured else None, "skipped": self.skipped,
                "runs": [asdict(r) for r in self.runs], "speculative": self.speculative}


def predict(cfg: Any, layout: Layout, cluster: Cluster, work: Workload, dtype: str, transport: str) -> Figures:
    """The cost model's figures for `work` at `layout`, the tp group over `transport` ("" or auto: default)."""
    used = cluster.with_transport(transport) if transport in ("shm", "gloo") else cluster
    e = estimate(cfg, layout, used, work, dtype)
    return Figures(e.prefill.total, e.decode.total, e.throughput)


def measure(llm: Any, work: Workload, runs: int, seed: int = 0) -> list[Figures]:
    """One Figures per timed run of `work` through llm.generate (after a warm-up run)."""
    from meshlm import SamplingParams

    rng, vocab = random.Random(seed), llm.cfg.vocab_size
    params = SamplingParams(max_tokens=work.output_tokens, ignore_eos=True)
    prompts = lambda: [[rng.randrange(3, vocab) for _ in range(work.prompt_tokens)] for _ in range(work.batch)]
    llm.generate(prompts(), params)  # warm-up
    out = []
    for _ in range(runs):
        res = llm.generate(prompts(), params)
        ttft = max(o.ttft_s for o in res)
        tpot = statistics.median(o.decode_s / max(1, len(o.token_ids) - 1) for o in res)
        out.append(Figures(ttft, tpot, work.batch / tpot))
    return out


def median(figs: list[Figures]) -> Figures:
    """Term by term median."""
    return Figures(*(statistics.median(getattr(f, k) for f in figs) for k in ("ttft", "tpot", "tok_s")))


def run_layout(model: str | None, layout: Layout, cluster: Cluster, work: Workload, runs: int = 3,
               dtype: str = "float32", transport: str | None = None, threads: int | None = None,
               quantize: str | None = None, speculative: Any = None) -> BenchResult:
    """Load `model` at `layout` on the engine path, measure `work`, and pair it with the prediction."""
    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig
    from meshlm.errors import MeshlmError

    t = (transport or "auto") if layout.tp > 1 else ""
    res = BenchResult(layout, t)
    if layout.dp != 1:
        res.skipped = "dp > 1: replicas do not talk to each other; bench one replica (dp=1)."
        return res
    try:
        llm = LLM(model, tp=layout.tp, pp=layout.pp, ep=layout.ep, threads=threads, dtype=dtype, quantize=quantize,
                  progress=False, engine=EngineConfig(kv_cache_mb=KV_MB), transport=transport, comm_timeout_s=300.0,
                  speculative=speculative)
    except MeshlmError as e:
        res.skipped = f"LLM(tp={layout.tp}, pp={layout.pp}, ep={layout.ep}) failed to start: {e}"
        return res
    with llm:
        res.runs = measure(llm, work, runs)
        c = llm.engine.stats().speculative
        if c is not None:  # warm-up included
            res.speculative = {"method": speculative.method, "drafts": c.drafts, "acceptance_rate": c.acceptance_rate,
                               "mean_accepted_length": c.mean_accepted_length, "per_position": c.per_position()}
        if layout.tp > 1:
            res.transport = llm.rank_info()[0].get("transport", t) or t
        cfg = llm.cfg
    res.measured = median(res.runs)
    # The prediction prices float weights of the compute dtype (auto computes in float32).
    res.predicted = predict(cfg, layout, cluster, work, "float32" if dtype == "auto" else dtype, res.transport)
    return res


def table(results: list[BenchResult]) -> str:
    """Layout, predicted and measured TTFT, TPOT and decode tok/s."""
    rows = [f"  {'layout':<20}{'TTFT ms pred':>13}{'meas':>9}{'TPOT ms pred':>14}{'meas':>9}"
            f"{'tok/s pred':>12}{'meas':>9}"]
    for r in results:
        if r.skipped:
            rows.append(f"  {r.name:<20}skipped: {r.skipped}")
            continue
        p, m = r.predicted, r.measured
        assert p is not None and m is not None
        rows.append(f"  {r.name:<20}{p.ttft * 1e3:>13.1f}{m.ttft * 1e3:>9.1f}{p.tpot * 1e3:>14.2f}"
                    f"{m.tpot * 1e3:>9.2f}{p.tok_s:>12.1f}{m.tok_s:>9.1f}")
        if r.speculative:  # the prediction prices no speculation
            s = r.speculative
            per = "/".join(f"{100 * x:.0f}" for x in s["per_position"]) or "-"
            rows.append(f"  {'':<20}speculative {s['method']}: {s['drafts']} drafts, acceptance "
                        f"{100 * s['acceptance_rate']:.0f}%, mean accepted length {s['mean_accepted_length']:.2f}, "
                        f"per position {per}%")
    return "\n".join(rows)


def add_parser(sub: Any) -> None:
    """The `bench` subcommand."""
    b = sub.add_parser("bench", help="run layouts on the engine and print predicted against measured",
                       description="Run each layout through meshlm.LLM (the engine: continuous batching at "
                                   "any pp) on a fixed workload and print the planner's predicted TTFT, TPOT "
                                   "and decode tokens/s beside the measured ones.")
    b.add_argument("--layout", action="append", required=True, metavar="pp=2,tp=1",
                   help="layout to run (repeatable); ep=2 runs an MoE model's experts whole on the 2 tp ranks")
    b.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2-135M)")
    b.add_argument("--cluster", default=None, help="profile to predict with (default: local)")
    b.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="float32 (default: what the prediction prices), or auto: a GGUF's quantized weights as "
                        "stored, float32 activations")
    b.add_argument("--quantize", default=None, choices=["int8", "int4", "int4-min"],
                   help="quantize a float model's linear and embedding weights at load (see meshlm generate)")
    b.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores // ranks)")
    b.add_argument("--transport", default=None, choices=["auto", "shm", "gloo"],
                   help="the tp collectives' transport (default auto)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    b.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    b.add_argument("--batch", type=int, default=4, help="requests arriving together (default 4)")
    b.add_argument("--runs", type=int, default=3, help="timed runs; medians (default 3)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    from meshlm.cli import add_speculative_args  # cli imports this module first: no cycle at import time

    add_speculative_args(b)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run each --layout and print predicted against measured."""
    from meshlm.cli import speculative_config

    c = clusters.resolve(args.cluster)
    spec = speculative_config(args)
    work = Workload(prompt_tokens=args.prompt_tokens, output_tokens=args.new_tokens, batch=args.batch)
    results = [run_layout(args.model, Layout.parse(t), c, work, args.runs, args.dtype, args.transport, args.threads,
                          args.quantize, spec)
               for t in args.layout]
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        print(f"workload: {work.batch} x {work.prompt_tokens}-token prompts, {work.output_tokens} new tokens; "
              f"cluster profile {c.name} ({c.notes.get('source', 'preset')})\n{table(results)}")
    return 0
