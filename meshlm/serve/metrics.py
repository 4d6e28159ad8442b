"""The server's Prometheus metrics: latency histograms, queue and KV gauges, token and rejection counters.

Each server has its own CollectorRegistry (several apps can live in one process). Request events update
prometheus_client metrics as they happen; the engine's figures are read from the loop's latest Snapshot
at scrape time by a collector, so /metrics never waits on the engine thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from meshlm.engine.engine_config import ExpertFigures  # serve never imports parallel
from meshlm.engine.spec_policy import SpecCounters
from meshlm.serve.engine_loop import Snapshot
from meshlm.serve.protocol import FinalStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
PREFIX = "meshlm"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format generate_latest writes

prometheus_client.disable_created_metrics()  # no *_created series: one sample per counter, as scrapers expect


class EngineCollector:
    """The engine's queue, KV, token, collective and pipeline figures from the latest Snapshot."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """One family per figure, read from one Snapshot."""
        snap = self.snapshot()
        s, p = snap.stats, PREFIX
        yield GaugeMetricFamily(f"{p}_num_requests_running", "Engine requests being computed.", s.running)
        yield GaugeMetricFamily(f"{p}_num_requests_waiting", "Engine requests queued for admission.", s.waiting)
        yield GaugeMetricFamily(f"{p}_kv_cache_usage_ratio", "Fraction of KV blocks held by live requests.",
                                s.kv_usage)
        yield CounterMetricFamily(f"{p}_num_preemptions_total", "Requests preempted to free KV blocks.",
                                  s.num_preemptions)
        yield CounterMetricFamily(f"{p}_prompt_tokens_total", "Prompt tokens admitted.", s.prompt_tokens)
        yield CounterMetricFamily(f"{p}_generation_tokens_total", "Tokens generated.", s.generation_tokens)
        yield CounterMetricFamily(f"{p}_engine_step_seconds_total", "Seconds rank 0 spent in engine steps.",
                                  snap.step_seconds)
        comm = CounterMetricFamily(f"{p}_collective_seconds_total",
                                   "Seconds rank 0 spent in collectives, by group and op.", labels=("group", "op"))
        for key, seconds in sorted(s.collective_seconds.items()):
            group, _, op = key.partition("/")
            comm.add_metric((group, op), seconds)
        yield comm
        rings = CounterMetricFamily(f"{p}_cp_ring_choices_total",
                                    "Context-parallel prefill steps, by the ring chosen.", labels=("ring",))
        for ring, n in sorted(s.cp_ring_choices.items()):
            rings.add_metric([ring], n)
        yield rings
        ratio = sum(s.collective_seconds.values()) / snap.step_seconds if snap.step_seconds > 0 else 0.0
        yield GaugeMetricFamily(f"{p}_communication_overhead_ratio",
                                "Collective seconds over engine step seconds (rank 0).", ratio)
        yield CounterMetricFamily(f"{p}_expert_tokens_dropped_total", "Routed (token, expert) rows an expert's "
                                  "capacity dropped (--expert-capacity; 0 when dropless).", s.expert_tokens_dropped)
        if s.experts is not None:
            yield from expert_families(s.experts)
        yield GaugeMetricFamily(f"{p}_pipeline_bubble_fraction",
                                "Fraction of pipelined time stage 0 waits for the later stages (0 without "
                                "pipelining).", s.bubble_fraction)
        if s.speculative is not None:
            yield from spec_families(s.speculative)


def expert_families(f: ExpertFigures) -> Iterator[Metric]:
    """Expert parallelism over the balancer's window: balance (max / mean rank load) per layer, rows per expert,
    all-to-all bytes per link (group indices), rebalances and expert copies they loaded."""
    p = f"{PREFIX}_expert"
    bal = GaugeMetricFamily(f"{p}_balance_ratio", "Max over mean rank load of a MoE layer's routed rows "
                            "(1: even).", labels=("layer",))
    load = GaugeMetricFamily(f"{p}_load_rows", "Rows routed to an expert over the window.", labels=("layer", "expert"))
    for layer in sorted(f.balance):
        bal.add_metric((str(layer),), f.balance[layer])
        for e, n in enumerate(f.load[layer]):
            load.add_metric((str(layer), str(e)), n)
    links = CounterMetricFamily(f"{p}_link_bytes_total", "All-to-all bytes (dispatch + combine) per link of the "
                                "expert-parallel group.", labels=("src", "dst"))
    for (a, b), n in sorted(f.link_bytes.items()):
        links.add_metric((str(a), str(b)), n)
    yield from (bal, load, links)
    yield CounterMetricFamily(f"{p}_rebalances_total", "Expert rebalances applied.", f.rebalances)
    yield CounterMetricFamily(f"{p}_moved_total", "Expert copies loaded by rebalances.", f.moved)
    total = f.buffer_hits + f.buffer_misses
    yield CounterMetricFamily(f"{p}_buffer_hits_total", "Expert uses found resident (--expert-budget).", f.buffer_hits)
    yield CounterMetricFamily(f"{p}_buffer_misses_total", "Expert uses read from host memory.", f.buffer_misses)
    yield GaugeMetricFamily(f"{p}_buffer_hit_ratio", "Expert buffer hits over uses since start.",
                            f.buffer_hits / total if total else 0.0)
    yield CounterMetricFamily(f"{p}_buffer_fetch_seconds_total", "Seconds reading experts into the buffer.",
                              f.buffer_fetch_seconds)


def spec_families(c: SpecCounters) -> Iterator[Metric]:
    """Speculative decoding: drafts, proposed and accepted tokens, acceptance rate, mean accepted length, and
    acceptance per proposal position (label `position`, 0 = the first proposed token)."""
    p = f"{PREFIX}_spec_decode"
    yield CounterMetricFamily(f"{p}_num_drafts_total", "Proposals verified (requests x steps that proposed).",
                              c.drafts)
    yield CounterMetricFamily(f"{p}_num_draft_tokens_total", "Tokens proposed and verified.", c.proposed)
    yield CounterMetricFamily(f"{p}_num_accepted_tokens_total", "Proposed tokens the target accepted.", c.accepted)
    yield GaugeMetricFamily(f"{p}_acceptance_rate", "Accepted over proposed tokens since start.", c.acceptance_rate)
    yield GaugeMetricFamily(f"{p}_mean_accepted_length", "Tokens a verification emits on average (accepted + "
                            "the target's own).", c.mean_accepted_length)
    per = CounterMetricFamily(f"{p}_num_accepted_tokens_per_pos_total", "Accepted tokens by proposal position.",
                              labels=("position",))
    rate = GaugeMetricFamily(f"{p}_acceptance_rate_per_pos", "Acceptance rate by proposal position.",
                             labels=("position",))
    for i, (n, r) in enumerate(zip(c.accepted_at, c.per_position())):
        per.add_metric((str(i),), n)
        rate.add_metric((str(i),), r)
    yield per
    yield rate


class ReplicaCollector:
    """Per replica (label `replica`): routable or not, its load and engine figures, failures and restarts."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        """One family per figure, one sample per replica."""
        p, reps = PREFIX, self.router.replicas

        def family(kind: type, name: str, doc: str, value: Callable[[Any], float]) -> Metric:
            fam = kind(f"{p}_replica_{name}", doc, labels=("replica",))
            for r in reps:
                fam.add_metric((str(r.index),), value(r))
            return fam

        yield family(GaugeMetricFamily, "up", "1 while the replica is healthy with a closed circuit (routable).",
                     lambda r: float(r.routable))
        yield family(GaugeMetricFamily, "outstanding_tokens", "Tokens the router expects the replica still "
                     "to compute (its requests' uncomputed prompts and remaining budgets).",
                     lambda r: r.view().outstanding)
        yield family(GaugeMetricFamily, "num_requests_running", "Engine requests being computed.",
                     lambda r: r.snapshot.stats.running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Engine requests queued for admission.",
                     lambda r: r.snapshot.stats.waiting)
        yield family(GaugeMetricFamily, "kv_cache_usage_ratio", "Fraction of KV blocks held by live requests.",
                     lambda r: r.snapshot.stats.kv_usage)
        yield family(CounterMetricFamily, "failures", "Times the replica was found failed.", lambda r: r.failures)
        yield family(CounterMetricFamily, "restarts", "Times the replica was restarted.", lambda r: r.restarts)
        yield family(GaugeMetricFamily, "last_detect_seconds", "Last failure: seconds from the replica's last "
                     "proof of progress to its detection.", lambda r: r.detect_s)
        yield family(GaugeMetricFamily, "last_recover_seconds", "Last failure: seconds from detection to "
                     "readmission.", lambda r: r.recover_s)
        yield from replica_expert_families(reps)
        yield CounterMetricFamily(f"{p}_requests_migrated_total", "Engine requests moved off a failed replica.",
                                  self.router.migrated)
        yield CounterMetricFamily(f"{p}_requests_lost_total", "Engine requests that failed because no replica "
                                  "could take them over (retries or deadline exhausted).", self.router.lost)


def replica_expert_families(replicas: list[Any]) -> Iterator[Metric]:
    """Each replica's own expert balance per layer and all-to-all bytes per link (the unlabelled meshlm_expert_*
    series take the worst balance and the sum over replicas); nothing while no replica reports experts."""
    figs = [(str(r.index), r.snapshot.stats.experts) for r in replicas if r.snapshot.stats.experts is not None]
    if not figs:
        return
    p = f"{PREFIX}_replica_expert"
    bal = GaugeMetricFamily(f"{p}_balance_ratio", "Max over mean rank load of a MoE layer's routed rows in the "
                            "replica (1: even).", labels=("replica", "layer"))
    links = CounterMetricFamily(f"{p}_link_bytes_total", "All-to-all bytes (dispatch + combine) per link of the "
                                "replica's expert-parallel group.", labels=("replica", "src", "dst"))
    for i, f in figs:
        for layer in sorted(f.balance):
            bal.add_metric((i, str(layer)), f.balance[layer])
        for (a, b), n in sorted(f.link_bytes.items()):
            links.add_metric((i, str(a), str(b)), n)
    yield from (bal, links)


class ServerMetrics:
    """Every metric /metrics shows, in this server's own registry."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds",
                              "Decode seconds per generated token after the first.", buckets=TOKEN_BUCKETS,
                              registry=r)
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Arrival to finish of an engine request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(f"{p}_request_queue_time_seconds", "Arrival to first scheduled step.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter(f"{p}_requests_finished_total", "Engine requests finished, by reason.",
                                ("finish_reason",), registry=r)
        self.rejected = Counter(f"{p}_requests_rejected_total", "HTTP requests refused, by reason.", ("reason",),
                                registry=r)
        self.http = Counter(f"{p}_http_requests_total", "HTTP responses, by route and status.",
                            ("route", "status"), registry=r)
        self.detect = Histogram(f"{p}_failure_detect_seconds", "Seconds from a replica's last proof of "
                                "progress to its failure being detected.", ("replica",), buckets=LATENCY_BUCKETS,
                                registry=r)
        self.recover = Histogram(f"{p}_failure_recover_seconds", "Seconds from a replica's failure being "
                                 "detected to its readmission.", ("replica",), buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.disconnects = Counter(f"{p}_client_disconnects_total", "Clients that left before their answer, by "
                                   "stage: body (mid-upload), response (waiting), stream (mid-stream).",
                                   ("stage",), registry=r)
        self.deadline = Counter(f"{p}_deadline_exceeded_total", "HTTP requests that missed their deadline, by "
                                "stage: queue (before the first token) or run.", ("stage",), registry=r)
        r.register(EngineCollector(snapshot))

    def observe_failure(self, kind: str, replica: int, seconds: float) -> None:
        """Record a detection ("detect") or a recovery ("recover") of a replica."""
        (self.detect if kind == "detect" else self.recover).labels(replica=str(replica)).observe(seconds)

    def observe_finish(self, stats: FinalStats | None, reason: str) -> None:
        """Record a finished engine request (called from the engine thread); no stats for aborts."""
        self.finished.labels(finish_reason=reason or "unknown").inc()
        if stats is None:
            return
        if stats.completion_tokens > 0:
            self.ttft.observe(stats.ttft_s)
            self.queue.observe(stats.queue_s)
        if stats.completion_tokens > 1:
            self.tpot.observe(stats.decode_s / (stats.completion_tokens - 1))
        self.e2e.observe(stats.e2e_s)

    def render(self) -> bytes:
        """The text exposition (format 0.0.4)."""
        return generate_latest(self.registry)


def parse_samples(text: str) -> dict[str, float]:
    """Samples of a text exposition as {'name{label="value",...}': value} (for tests and load scripts)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
