"""`meshlm bench --layout tp=2,pp=1`: run a layout through meshlm.LLM; predicted against measured per term.

The one module of plan/ that drives the engine (imported by the CLI and benchmarks only). Runs, each
timed by wall clock around LLM.generate with fresh random prompts (no prefix-cache hits):
  prefill: one `prompt`-token prompt, max_tokens=1                    -> TTFT terms
  decode:  `batch` 16-token prompts with max_tokens=1 (A) and `new` (B) -> TPOT terms = (B - A) / (new - 1)
Measured terms at pp = 1 come from rank 0's comm_stats(): collectives = tp/* plus */broadcast_object
seconds (the executor's control channel), compute = the rest of the wall time. The control broadcast is
folded into collectives on both sides: rank 0 only posts it, and its latency shows up as rank 0's wait
in the step's first all-reduce (the other ranks start late by that much). At pp > 1 the terms come from
the pipeline report of the busiest rank: compute (less its tp collectives), collectives, p2p (send +
recv) and bubble (idle).
Medians over `runs`, after a warm-up.
Rescaling (on by default; `rescale=False`, `meshlm bench --no-rescale` turn it off): when the profile
kept its calibration's host reading (host.py), the same short probe is read before the engine starts,
right before every timed run and after the engine stops, and each phase is predicted from the profile
scaled by the mean of the readings beside its runs (host.beside) against that reference (bandwidths x
bandwidth now / then, matmul rates x matmul now / then); the scales and the readings are reported beside
the predictions, and the unscaled predictions kept in `unscaled`.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlm.plan.cluster import Cluster
from meshlm.plan.cost import Estimate, estimate
from meshlm.plan.host import HostProbe, HostReading, Scale, beside, mean, reference, rescale, scale_of
from meshlm.plan.layout import Layout, Workload

KEYS = ("compute", "collectives", "p2p", "bubble", "total")
SHORT = 16  # decode runs' prompt length
KV_MB = 256  # per rank: enough for the runs here, and no large allocation on a shared host


@dataclass
class BenchResult:
    """Predicted and measured seconds per term of both phases, or why the layout was skipped."""

    layout: Layout
    model: str
    transport: str = ""
    predicted: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> term -> seconds
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: str = ""
    host: list[HostReading] = field(default_factory=list)  # the host's readings, labelled by when (host.py)
    scales: dict[str, Scale] = field(default_factory=dict)  # phase -> applied to the profile for `predicted`
    unscaled: dict[str, dict[str, float]] = field(default_factory=dict)  # the profile as calibrated

    def error(self, phase: str, term: str) -> float | None:
        """(predicted - measured) / measured, or None when the measured term is ~0."""
        m, p = self.measured[phase][term], self.predicted[phase][term]
        return None if m < 1e-6 else (p - m) / m

    def as_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"layout": str(self.layout), "model": self.model, "transport": self.transport,
                "predicted": self.predicted, "measured": self.measured, "skipped": self.skipped,
                "host": [h.as_dict() for h in self.host], "host_gbs": [h.bandwidth / 1e9 for h in self.host],
                "scale": {ph: {"bandwidth": s.bandwidth, "matmul": s.matmul} for ph, s in self.scales.items()},
                "unscaled": self.unscaled}


def _ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _pp1_terms(llm: Any, wall: float) -> dict[str, float]:
    stats = llm.comm_stats()[0]
    coll = sum(v["seconds"] for k, v in stats.items() if k.startswith("tp/"))
    for key, ctl in stats.items():  # the executor's per-step message ("control" group; "world" before)
        if key.endswith("/broadcast_object") and ctl["calls"]:
            coll += ctl["seconds"] * (1 - 1 / ctl["calls"])  # less comm_stats' own call
    return {"compute": wall - coll, "collectives": coll, "p2p": 0.0, "bubble": 0.0, "total": wall}


def _pp_terms(llm: Any, wall: float) -> dict[str, float]:
    reports = [r for r in llm.pipeline_report() if r]
    busiest = max(reports, key=lambda r: r["timeline"]["totals"]["compute"])
    t, tp = busiest["timeline"]["totals"], busiest.get("tp_comm_s", 0.0)
    return {"compute": t["compute"] - tp, "collectives": tp, "p2p": t["send"] + t["recv"],
            "bubble": t["idle"], "total": wall}


def _run(llm: Any, prompts: list[list[int]], max_tokens: int, pp: int) -> dict[str, float]:
    from meshlm import SamplingParams

    llm.reset_comm_stats()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    return _pp_terms(llm, wall) if pp > 1 else _pp1_terms(llm, wall)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in KEYS}


def measure(llm: Any, layout: Layout, prompt: int, new: int, batch: int, runs: int, seed: int = 0,
            before: Callable[[str], Any] | None = None) -> dict[str, dict[str, float]]:
    """Seconds per term: TTFT of one prompt, TPOT of `batch` sequences; `before(phase)` precedes each timed run."""
    rng, vocab, pp = random.Random(seed), llm.cfg.vocab_size, layout.pp
    before = before or (lambda phase: None)
    _run(llm, [_ids(SHORT, vocab, rng) for _ in range(batch)], 4, pp)  # warm-up: both phases
    _run(llm, [_ids(prompt, vocab, rng)], 1, pp)
    pre = []
    for _ in range(runs):
        before("prefill")
        pre.append(_run(llm, [_ids(prompt, vocab, rng)], 1, pp))
    dec = []
    for _ in range(runs):
        before("decode")
        a = _run(llm, [_ids(SHORT, vocab, rng) for _ in range(batch)], 1, pp)
        b = _run(llm, [_ids(SHORT, vocab, rng) for _ in range(batch)], new, pp)
        dec.append({k: (b[k] - a[k]) / (new - 1) for k in KEYS})
    return {"prefill": _median(pre), "decode": _median(dec)}


def predict(cfg: Any, layout: Layout, cluster: Cluster, prompt: int, new: int, batch: int,
            dtype: str) -> tuple[Estimate, Estimate]:
    """The cost model's estimates for the two measured runs (prefill, decode)."""
    pre = estimate(cfg, layout, cluster, Workload(prompt_tokens=prompt, output_tokens=1, batch=1), dtype)
    dec = estimate(cfg, layout, cluster, Workload(prompt_tokens=SHORT, output_tokens=new, batch=batch), dtype)
    return pre, dec


def predicted_terms(cfg: Any, layout: Layout, cluster: Cluster, prompt: int, new: int, batch: int, dtype: str,
                    transport: str = "") -> dict[str, dict[str, float]]:
    """Seconds per term of both measured runs, as measure() reports them; `transport`: the tp group's."""
    used = cluster.with_transport(transport.split("+")[0]) if transport else cluster
    pre, dec = predict(cfg, layout, used, prompt, new, batch, dtype)
    return {ph: {"compute": t.compute, "collectives": t.collectives + t.control, "p2p": t.p2p,
                 "bubble": t.bubble, "total": t.total}
            for ph, t in (("prefill", pre.prefill), ("decode", dec.decode))}


def rescaled_terms(cfg: Any, layout: Layout, cluster: Cluster, prompt: int, new: int, batch: int, dtype: str,
                   transport: str, ref: HostReading | None,
                   readings: list[HostReading]) -> tuple[dict[str, dict[str, float]], dict[str, Scale]]:
    """predicted_terms with each phase from the profile rescaled to the readings beside that phase's runs
    (host.beside) against `ref`; and the scale per phase (1 without a reference or readings)."""
    terms: dict[str, dict[str, float]] = {}
    scales: dict[str, Scale] = {}
    for phase in ("prefill", "decode"):
        now = beside(readings, phase)
        scales[phase] = scale_of(ref, mean(now)) if now else Scale()
        terms[phase] = predicted_terms(cfg, layout, rescale(cluster, scales[phase]), prompt, new, batch, dtype,
                                       transport)[phase]
    return terms, scales


def transport_of(llm: Any) -> str:
    """The transport of the tp collectives, from comm_stats() ("" when there were none)."""
    stats = llm.comm_stats()[0]
    return next((str(v.get("transport", "")) for k, v in stats.items() if k.startswith("tp/")), "")


def run_bench(model: str | None, layout: Layout, cluster: Cluster, prompt: int = 256, new: int = 32,
              batch: int = 1, threads: int = 1, runs: int = 3, dtype: str = "float32",
              transport: str | None = None, before: Callable[[], Any] | None = None,
              rescale_to_host: bool = True) -> BenchResult:
    """Load `model` at `layout`, measure both phases, and pair each term with its prediction (from the
    profile rescaled to the host's readings beside the runs, when `rescale_to_host` and the profile has a
    reference reading)."""
    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig
    from meshlm.errors import MeshlmError
    from meshlm.parallel.pipeline import PipelineSpec

    name = model or "SmolLM2-135M (bundled)"
    res = BenchResult(layout, name)
    if layout.dp != 1:
        res.skipped = "dp > 1: replicas do not talk to each other; bench one replica (dp=1)."
        return res
    ref = reference(cluster) if rescale_to_host else None
    probe = HostProbe() if ref is not None else None
    if probe is not None:
        res.host.append(probe.read("start"))  # before the ranks start: nothing else on the cores
    try:
        llm = LLM(model, tp=layout.tp, pp=layout.pp, threads=threads, dtype=dtype, progress=False,
                  engine=EngineConfig(kv_cache_mb=KV_MB), transport=transport, comm_timeout_s=300.0,
                  pipeline=PipelineSpec(schedule="static"))  # pp > 1: the schedule whose terms are traced
    except (TypeError, NotImplementedError) as e:  # an LLM without pipeline parallelism
        res.skipped = f"LLM(tp={layout.tp}, pp={layout.pp}) is not available here: {e}"
        return res
    except MeshlmError as e:
        res.skipped = f"LLM(tp={layout.tp}, pp={layout.pp}) failed to start: {e}"
        return res

    def hook(phase: str) -> None:  # the caller's, then a reading while the other ranks sleep between runs
        if before is not None:
            before()
        if probe is not None:
            res.host.append(probe.read(phase))

    with llm:
        measured = measure(llm, layout, prompt, new, batch, runs, before=hook)
        res.transport = transport_of(llm) if layout.tp > 1 else ""
    res.unscaled = predicted_terms(llm.cfg, layout, cluster, prompt, new, batch, dtype, res.transport)
    res.predicted = res.unscaled
    if probe is not None:
        res.host.append(probe.read("end"))
        res.predicted, res.scales = rescaled_terms(llm.cfg, layout, cluster, prompt, new, batch, dtype,
                                                   res.transport, ref, res.host)
    res.measured = measured
    return res


def format_bench(res: BenchResult, cluster: Cluster) -> str:
    """Table: phase, term, predicted ms, measured ms, error."""
    head = f"{res.model} at {res.layout}" + (f" over {res.transport}" if res.transport else "")
    if res.skipped:
        return f"{head}: skipped: {res.skipped}"
    lines = [f"{head}; cluster profile {cluster.name} ({cluster.notes.get('source', 'preset')})"]
    ref = reference(cluster)
    if res.host and ref is not None:
        for phase, sc in res.scales.items():
            now = mean(beside(res.host, phase))
            lines.append(f"  host beside the {phase} runs {now.bandwidth / 1e9:.1f} GB/s, {now.matmul / 1e9:.0f} "
                         f"GFLOP/s against {ref.bandwidth / 1e9:.1f}, {ref.matmul / 1e9:.0f} at calibration: "
                         f"predicted with {sc.text()}")
    else:
        lines.append("  predicted from the profile as calibrated (not rescaled to the host now)")
    lines.append(f"  {'phase':<9}{'term':<13}{'predicted ms':>14}{'measured ms':>13}{'error':>8}")
    for phase in ("prefill", "decode"):
        for term in KEYS:
            p, m = res.predicted[phase][term], res.measured[phase][term]
            if term not in ("total", "compute") and p < 1e-6 and abs(m) < 1e-6:
                continue
            err = res.error(phase, term)
            lines.append(f"  {phase:<9}{term:<13}{p * 1e3:>14.2f}{m * 1e3:>13.2f}"
                         f"{'' if err is None else f'{err:+.0%}':>8}")
    return "\n".join(lines)
