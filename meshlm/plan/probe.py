"""In-engine calibration: what an all-reduce costs inside a tp=2 step, and a layer inside a pp=2 stage.

The synthetic all-reduce fit (calibrate.py) times calls between two processes that do little else; inside
an engine step each call also waits for the slower peer and pays its dispatch, and the docs measured
80-300 us per call there against 39 us in the fit. So a random Llama of a shape of neither benchmark model
(overhead.COLD: hidden 512, 24 layers, ~290 MB fp32; 4 layers with `quick`) runs through meshlm.LLM:
  tp=2, per transport   decode: (a `new`-token run - a 1-token run) / (new - 1) per step; prefill: a
                        128- and a 448-token prompt (quick: 128), the median of 3 runs each (single
                        runs gave the noisiest points). Per sample: all-reduce seconds and calls on rank 0
                        and the compute between calls (segment = (wall - tp collectives - step overhead)
                        / calls). Extra wait per call = seconds per call - the fitted alpha-beta time of
                        its bytes; a point per sample (decode, prefills) -> Link.waits.
                        The same samples give compute points: (the cost model's segment, measured
                        segment - that) per transport -> Link.slows (the compute a transport's threads
                        slow down; gloo's run on the ranks' cores).
  pp=2, static schedule decode as above; the busiest rank's compute per step, less the cost model's own
                        prediction of that stage without layer overhead and less the step overhead, per
                        layer of the stage -> Device.pipeline_layer_overhead.
Every measurement is taken in ROUNDS rounds: the wait points of all rounds go to the robust line fit
(fit.wait_line), the pipeline figure is the median of the rounds' (not with `quick`: one round).
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshlm.plan.cluster import Cluster, Link
from meshlm.plan.cost import Model, Pass, all_reduce, forward_seconds
from meshlm.plan.host import Then, as_calibrated
from meshlm.plan.layout import Layout
from meshlm.plan.overhead import COLD, tiny_checkpoint

log = logging.getLogger(__name__)
ROUNDS = 6  # rounds of every in-engine measurement (not with quick); 3 until session 5, whose saved runs
# showed the wait line of 9 points moving 0.000-0.314 x segment between calibrations
PROMPTS, SHORT = (128, 448), 16  # prefill prompts (448 tokens: ~7 ms between calls; 512 positions), decode


@dataclass(frozen=True)
class Sample:
    """One timed generate: wall seconds, rank 0's all-reduce seconds/calls/bytes, all tp collective seconds
    and calls, and the pipeline report's busiest compute seconds (pp > 1)."""

    wall: float
    ar_s: float
    ar_calls: float
    ar_bytes: float
    tp_s: float
    tp_calls: float
    stage_compute: float = 0.0
    stage: int = 0

    def minus(self, o: Sample, steps: int) -> Sample:
        """(self - o) / steps, term by term (the stage of self)."""
        f = lambda a, b: (a - b) / steps
        return Sample(f(self.wall, o.wall), f(self.ar_s, o.ar_s), f(self.ar_calls, o.ar_calls),
                      f(self.ar_bytes, o.ar_bytes), f(self.tp_s, o.tp_s), f(self.tp_calls, o.tp_calls),
                      f(self.stage_compute, o.stage_compute), self.stage)


def _run(llm: Any, pp: int, prompts: list[list[int]], new: int) -> Sample:
    from meshlm import SamplingParams

    llm.reset_comm_stats()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    wall = time.perf_counter() - t0
    stats = llm.comm_stats()[0]
    ar = stats.get("tp/all_reduce", {"seconds": 0.0, "calls": 0, "bytes": 0})
    tp = [v for k, v in stats.items() if k.startswith("tp/")]
    reports = [r for r in llm.pipeline_report() if r] if pp > 1 else []
    busiest = max(reports, key=lambda r: r["timeline"]["totals"]["compute"], default=None)
    comp, stage = (busiest["timeline"]["totals"]["compute"], busiest["stage"]) if busiest else (0.0, 0)
    return Sample(wall, ar["seconds"], ar["calls"], ar["bytes"], sum(v["seconds"] for v in tp),
                  sum(v["calls"] for v in tp), comp, stage)


class Probe:
    """meshlm.LLM (1 thread per rank) on the probe model, with fresh random prompts for every run."""

    def __init__(self, path: Path, tp: int, pp: int, transport: str | None = None) -> None:
        from meshlm import LLM
        from meshlm.engine.engine import EngineConfig
        from meshlm.parallel.pipeline import PipelineSpec

        self.pp, self.rng = pp, random.Random(0)
        self.llm = LLM(str(path), tp=tp, pp=pp, threads=1, progress=False, transport=transport,
                       engine=EngineConfig(kv_cache_mb=64), comm_timeout_s=120.0,
                       pipeline=PipelineSpec(schedule="static"))

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.llm.__exit__(*exc)

    def _prompt(self, n: int) -> list[list[int]]:
        return [[self.rng.randrange(3, COLD["vocab_size"]) for _ in range(n)]]

    def decode(self, new: int, runs: int) -> Sample:
        """Per-step sample: the median (by wall) of `runs` (new-token run - 1-token run) / (new - 1)."""
        steps = []
        for _ in range(runs):
            a = _run(self.llm, self.pp, self._prompt(SHORT), 1)
            b = _run(self.llm, self.pp, self._prompt(SHORT), new)
            steps.append(b.minus(a, new - 1))
        return sorted(steps, key=lambda s: s.wall)[len(steps) // 2]

    def prefill(self, tokens: int, runs: int) -> Sample:
        """The median (by wall) of `runs` one-token runs of a `tokens`-token prompt."""
        samples = sorted((_run(self.llm, self.pp, self._prompt(tokens), 1) for _ in range(runs)),
                         key=lambda s: s.wall)
        return samples[len(samples) // 2]


def segment(s: Sample, step_overhead: float) -> float:
    """Seconds of compute before each tp collective of one sample (its wall less collectives and step)."""
    return max(0.0, s.wall - s.tp_s - step_overhead) / max(s.tp_calls, 1e-9)


def wait_point(s: Sample, link: Link, step_overhead: float) -> tuple[float, float]:
    """(compute segment before a call, extra wait per all-reduce beyond alpha-beta) of one sample."""
    per_call = s.ar_s / max(s.ar_calls, 1e-9)
    nbytes = s.ar_bytes / max(s.ar_calls, 1e-9)
    return segment(s, step_overhead), max(0.0, per_call - all_reduce(link, 2, nbytes))


def decode_sample(eng: Probe, new: int, runs: int, step_overhead: float, tries: int = 3) -> Sample:
    """A decode sample with some compute left: one whose wall is no more than its collectives and the
    step overhead (a difference of two runs that noise swamped) is taken again, up to `tries` times,
    rather than kept as a point at zero compute."""
    for _ in range(tries):
        s = eng.decode(new, runs)
        if s.wall - s.tp_s - step_overhead > 0:
            break
        log.info("decode probe: no compute left after collectives and step overhead; measuring again")
    return s


def slow_point(s: Sample, cfg: Any, cluster: Cluster, work: Pass) -> tuple[float, float]:
    """(the cost model's compute segment before a call, measured segment - that) of a tp=2 sample: the
    compute the transport adds between two collectives beyond the roofline."""
    model = Model(cfg, Layout(1, 1, 2), cluster, "float32")
    best = max(forward_seconds(cfg, r, work, model.rates)[0] for r in model.shares)
    calls = model.tp_calls(0)
    return best / calls, segment(s, cluster.node.device.step_overhead) - best / calls


def stage_layer_overhead(s: Sample, cfg: Any, cluster: Cluster, ctx: float) -> float:
    """Seconds per layer of a pp=2 stage's measured compute beyond the cost model's prediction of that
    stage with no layer overhead (its step overhead included), for one decode row over `ctx` keys."""
    dev = replace(cluster.node.device, layer_overhead=0.0, pipeline_layer_overhead=0.0)
    bare = replace(cluster, node=replace(cluster.node, device=dev))
    model = Model(cfg, Layout(1, 2, 1), bare, "float32")
    predicted = model.stage(s.stage, Pass(1, ctx, ctx, 1)).compute
    layers = next(r.layers for r in model.shares if r.stage == s.stage)
    return max(0.0, (s.stage_compute - predicted) / layers)


@dataclass(frozen=True)
class Probed:
    """What the in-engine probe measured: per transport, wait points (measured segment, extra wait per
    call) and compute points (roofline segment, extra compute per call); seconds per pipeline layer."""

    waits: dict[str, tuple[tuple[float, float], ...]]
    slows: dict[str, tuple[tuple[float, float], ...]]
    pipeline_layer: float


def probe(cluster: Cluster, quick: bool = False, rounds: int = ROUNDS, then: Then | None = None) -> Probed:
    """Wait and compute points per transport and the pipeline seconds per layer, measured in the engine on
    this host over `rounds` rounds (1 with `quick`): every round adds its points (the lines through them
    are fitted robustly, fit.wait_line), and the pipeline figure is the median of the rounds' figures.
    `then` (host.beside_run bound to the calibration's probe) times each sample between two readings of
    the host; its compute beyond the roofline is then set against the profile rescaled to that state."""
    import statistics

    from meshlm.config import ModelConfig
    from meshlm.plan.host import rescale

    then = then or as_calibrated

    layers = 4 if quick else 24
    new, runs = (16, 3) if quick else (24, 3)
    prompts = PROMPTS[:1] if quick else PROMPTS
    rounds = 1 if quick else rounds
    step = cluster.node.device.step_overhead
    cfg = ModelConfig.from_hf({**COLD, "num_hidden_layers": layers})
    waits: dict[str, tuple[tuple[float, float], ...]] = {}
    slows: dict[str, tuple[tuple[float, float], ...]] = {}
    with tempfile.TemporaryDirectory(prefix="meshlm-probe-") as tmp:
        path = tiny_checkpoint(Path(tmp) / "probe", layers, COLD)
        for ln in cluster.node.links:
            pts, extra = [], []
            with Probe(path, 2, 1, ln.transport) as eng:
                eng.decode(new, 1)  # warm-up
                ctx = SHORT + new / 2
                for _ in range(rounds):
                    samples = [(*then(lambda: decode_sample(eng, new, runs, step)), Pass(1, ctx, ctx, 1))]
                    samples += [(*then(lambda n=n: eng.prefill(n, runs)), Pass(n, n * (n + 1) / 2, n, 1))
                                for n in prompts]
                    pts += [wait_point(x, ln, step) for x, _, _ in samples]
                    extra += [slow_point(x, cfg, rescale(cluster, sc), w) for x, sc, w in samples]
            waits[ln.transport] = tuple(sorted(pts))
            slows[ln.transport] = tuple(sorted(extra))
        with Probe(path, 1, 2) as eng:
            eng.decode(new, 1)
            # the median of the rounds' per-layer figures: a residual like overhead.py's (either sign of
            # noise), and the benchmark compares with median steps
            per_round = []
            for _ in range(rounds):
                x, sc = then(lambda: eng.decode(new, runs))
                per_round.append(stage_layer_overhead(x, cfg, rescale(cluster, sc), SHORT + new / 2))
    us = lambda d: {t: [(round(a * 1e6), round(b * 1e6)) for a, b in pts] for t, pts in d.items()}
    log.info("pipeline layer rounds (us): %s; wait points (segment us, wait us): %s; compute points "
             "(roofline segment us, extra us): %s", [round(x * 1e6) for x in per_round], us(waits), us(slows))
    pipe = statistics.median(per_round)
    return Probed(waits, slows, pipe)
