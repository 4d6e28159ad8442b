"""The server's Prometheus metrics: latency histograms, queue and KV gauges, token and rejection counters."""

from __future__ import annotations

from collections.abc import Callable

from meshlm.serve.engine_loop import Snapshot
from meshlm.serve.protocol import FinalStats
from meshlm.telemetry.metrics import Registry

TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
PREFIX = "meshlm"


class ServerMetrics:
    """Every metric /metrics shows; engine figures are read from the loop's latest Snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot
        r = self.registry = Registry()
        p = PREFIX
        self.ttft = r.histogram(f"{p}_time_to_first_token_seconds", "Arrival to first generated token.")
        self.tpot = r.histogram(f"{p}_time_per_output_token_seconds",
                                "Decode seconds per generated token after the first.", TOKEN_BUCKETS)
        self.e2e = r.histogram(f"{p}_e2e_request_latency_seconds", "Arrival to finish of an engine request.")
        self.queue = r.histogram(f"{p}_request_queue_time_seconds", "Arrival to first scheduled step.")
        self.finished = r.counter(f"{p}_requests_finished_total", "Engine requests finished, by reason.",
                                  ("finish_reason",))
        self.rejected = r.counter(f"{p}_requests_rejected_total", "HTTP requests refused, by reason.",
                                  ("reason",))
        self.http = r.counter(f"{p}_http_requests_total", "HTTP responses, by route and status.",
                              ("route", "status"))
        self.running = r.gauge(f"{p}_num_requests_running", "Engine requests being computed.",
                               fn=lambda: self.snapshot().running)
        self.waiting = r.gauge(f"{p}_num_requests_waiting", "Engine requests queued for admission.",
                               fn=lambda: self.snapshot().waiting)
        self.kv = r.gauge(f"{p}_kv_cache_usage_ratio", "Fraction of KV blocks held by live requests.",
                          fn=lambda: self.snapshot().kv_usage)
        self.preemptions = r.counter(f"{p}_num_preemptions_total", "Requests preempted to free KV blocks.")
        self.prompt_tokens = r.counter(f"{p}_prompt_tokens_total", "Prompt tokens admitted.")
        self.gen_tokens = r.counter(f"{p}_generation_tokens_total", "Tokens generated.")
        self.step_s = r.counter(f"{p}_engine_step_seconds_total", "Seconds rank 0 spent in engine steps.")
        self.comm = r.counter(f"{p}_collective_seconds_total",
                              "Seconds rank 0 spent in collectives, by group and op.", ("group", "op"))
        self.comm_ratio = r.gauge(f"{p}_communication_overhead_ratio",
                                  "Collective seconds over engine step seconds (rank 0).",
                                  fn=self._comm_ratio)
        self.bubble = r.gauge(f"{p}_pipeline_bubble_fraction",
                              "Fraction of pipelined time stage 0 waits for the later stages (0 without pipelining).",
                              fn=lambda: self.snapshot().bubble_fraction)

    def _comm_ratio(self) -> float:
        s = self.snapshot()
        return sum(s.collective_seconds.values()) / s.step_seconds if s.step_seconds > 0 else 0.0

    def observe_finish(self, stats: FinalStats | None, reason: str) -> None:
        """Record a finished engine request (called from the engine thread); no stats for aborts."""
        self.finished.inc(finish_reason=reason or "unknown")
        if stats is None:
            return
        if stats.completion_tokens > 0:
            self.ttft.observe(stats.ttft_s)
            self.queue.observe(stats.queue_s)
        if stats.completion_tokens > 1:
            self.tpot.observe(stats.decode_s / (stats.completion_tokens - 1))
        self.e2e.observe(stats.e2e_s)

    def render(self) -> str:
        """The text exposition, with the engine totals brought up to date."""
        s = self.snapshot()
        self.preemptions.set_total(s.num_preemptions)
        self.prompt_tokens.set_total(s.prompt_tokens)
        self.gen_tokens.set_total(s.generation_tokens)
        self.step_s.set_total(s.step_seconds)
        for key, seconds in s.collective_seconds.items():
            group, _, op = key.partition("/")
            self.comm.set_total(seconds, group=group, op=op)
        return self.registry.render()
