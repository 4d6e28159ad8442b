"""Per-rank timelines: named spans, their totals, the bubble fraction, and Chrome trace JSON (Perfetto).

A rank records every piece of its run as a span: `compute` (forward passes, sampling, bookkeeping),
`send` (posting a transfer, and waiting for posted transfers at the end), `recv` (a payload arriving)
and `idle` (waiting for a peer to start sending: the pipeline bubble). Spans are seconds since the
run's start, which every rank takes right after one barrier, so rows line up in the trace. A `chained`
span starts where the previous one ended, so the loop's own bookkeeping between two pieces of work is
counted as the compute it prepares rather than lost. Time the caller holds control (a streaming consumer
between tokens) is kept apart as `away` and is not wall time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CATEGORIES = ("compute", "send", "recv", "idle")
COLORS = {"compute": "good", "send": "rail_response", "recv": "rail_load", "idle": "grey"}  # trace viewer


class Timeline:
    """The spans of one rank's run: (name, start_s, duration_s, args)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.mark = self.t0  # where the last span ended
        self.end: float | None = None
        self.away = 0.0
        self.spans: list[tuple[str, float, float, dict[str, Any]]] = []

    def restart(self) -> None:
        """Forget every span and start the clock now."""
        self.__init__()

    @contextmanager
    def span(self, name: str, chained: bool = False, **args: Any) -> Iterator[None]:
        """Record the time inside the block as one span (from the end of the last span when chained)."""
        t = self.mark if chained else time.perf_counter()
        try:
            yield
        finally:
            self.record(name, t, time.perf_counter(), **args)

    def record(self, name: str, start: float, stop: float, **args: Any) -> None:
        """Add a span given perf_counter() readings."""
        self.spans.append((name, start - self.t0, stop - start, args))
        self.mark = stop

    def step_away(self, start: float) -> None:
        """The caller held control from `start` until now: not part of this rank's wall time."""
        now = time.perf_counter()
        self.away += now - start
        self.mark = now

    def stop(self) -> None:
        """Stop the clock (the run's wall time ends here)."""
        self.end = time.perf_counter()

    def totals(self) -> dict[str, float]:
        """Seconds per category, wall seconds, untracked seconds, busy and bubble fractions."""
        out = {c: 0.0 for c in CATEGORIES}
        for name, _, dur, _ in self.spans:
            out[name] = out.get(name, 0.0) + dur
        wall = (self.end if self.end is not None else time.perf_counter()) - self.t0 - self.away
        out["wall"] = wall
        out["untracked"] = wall - sum(out[c] for c in CATEGORIES)
        out["busy"] = out["compute"] / wall if wall > 0 else 0.0
        out["bubble"] = out["idle"] / wall if wall > 0 else 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (sent to rank 0): the spans and their totals."""
        return {"spans": list(self.spans), "totals": self.totals()}


def chrome_trace(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Trace Event Format: one process row per rank ("X" events in microseconds)."""
    events: list[dict[str, Any]] = []
    for rep in reports:
        pid = rep["rank"]
        label = f"rank {pid}: stage {rep.get('stage', 0)}, tp {rep.get('tp_index', 0)}"
        if "layers" in rep:
            label += f", layers {rep['layers'][0]}..{rep['layers'][1] - 1}"
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        for name, start, dur, args in rep["timeline"]["spans"]:
            ev = {"name": name, "cat": name, "ph": "X", "pid": pid, "tid": 0,
                  "ts": round(start * 1e6, 3), "dur": round(dur * 1e6, 3), "args": args}
            if name in COLORS:
                ev["cname"] = COLORS[name]
            events.append(ev)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | Path, reports: list[dict[str, Any]]) -> Path:
    """Write the reports of every rank as one Chrome trace JSON file (opens in ui.perfetto.dev)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(reports)))
    return path


def summary_line(rep: dict[str, Any]) -> str:
    """One line per rank: stage, layers, seconds per category, busy and bubble fractions, memory."""
    t = rep["timeline"]["totals"]
    a, b = rep.get("layers", (0, 0))
    ms = {k: round(t[k] * 1000) for k in ("wall", *CATEGORIES)}
    return (f"rank {rep['rank']} (stage {rep.get('stage', 0)}, tp {rep.get('tp_index', 0)}, "
            f"layers {a}..{b - 1}): wall {ms['wall']} ms = compute {ms['compute']} + send {ms['send']} "
            f"+ recv {ms['recv']} + idle {ms['idle']} ms | busy {t['busy']:.0%} bubble {t['bubble']:.0%} | "
            f"weights {rep.get('weight_mb', 0):.0f} MB, KV {rep.get('kv_mb', 0):.1f} MB, "
            f"peak RSS {rep.get('peak_rss_mb', 0):.0f} MB")
