"""Per-rank timelines of pipelined engine steps: span totals, busy and bubble fractions, Chrome trace JSON.

A rank records each piece of its pipelined work as a span: `compute` (its layers, and on rank 0 the
engine's scheduling and sampling between steps), `send` (posting a transfer, and waiting for posted ones
when the pipeline stops), `recv` (a payload arriving) and `idle` (waiting for a peer to start sending:
the pipeline bubble). Starts are seconds since the timeline's start, which every rank takes right after
one barrier, so rows line up in the trace. Time the ranks spend outside the pipeline (the engine paused,
no work) is `away` and not part of the wall time. Without `spans` a timeline keeps only the totals: a
server records that way for ever at the cost of a few additions per step.
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
    """One rank's pipelined time: seconds per category, and (spans=True) every span (name, start_s, dur_s, args)."""

    def __init__(self, spans: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.mark = self.t0  # where the last span ended
        self.away = 0.0
        self.paused = True  # outside the pipeline until resume()
        self.sums = dict.fromkeys(CATEGORIES, 0.0)
        self.spans: list[tuple[str, float, float, dict[str, Any]]] | None = [] if spans else None

    def record(self, name: str, start: float, stop: float, **args: Any) -> None:
        """Add a span given perf_counter() readings."""
        self.sums[name] += stop - start
        if self.spans is not None:
            self.spans.append((name, start - self.t0, stop - start, args))
        self.mark = stop

    @contextmanager
    def span(self, name: str, chained: bool = False, **args: Any) -> Iterator[None]:
        """Record the block as one span (from the end of the last span when chained)."""
        start = self.mark if chained else time.perf_counter()
        try:
            yield
        finally:
            self.record(name, start, time.perf_counter(), **args)

    def resume(self) -> None:
        """Back in the pipeline: the time since the last span was spent away (not wall time)."""
        if self.paused:
            now = time.perf_counter()
            self.away += now - self.mark
            self.mark, self.paused = now, False

    def pause(self) -> None:
        """Out of the pipeline from the end of the last span."""
        self.paused = True

    def totals(self) -> dict[str, float]:
        """Seconds per category, wall seconds (to the last span's end), untracked seconds, busy and bubble."""
        out = dict(self.sums)
        wall = self.mark - self.t0 - self.away
        out["wall"] = wall
        out["untracked"] = wall - sum(self.sums.values())
        out["busy"] = out["compute"] / wall if wall > 0 else 0.0
        out["bubble"] = out["idle"] / wall if wall > 0 else 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (sent to rank 0): the spans (empty when only totals are kept) and the totals."""
        return {"spans": list(self.spans or ()), "totals": self.totals()}


def chrome_trace(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Trace Event Format: one process row per rank ("X" events in microseconds)."""
    events: list[dict[str, Any]] = []
    for rep in reports:
        pid = rep["rank"]
        label = f"rank {pid}: stage {rep.get('stage', 0)}, tp {rep.get('tp_index', 0)}" + _cp(rep)
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


def _cp(rep: dict[str, Any]) -> str:
    """", cp i" for a context-parallel rank's report (cp > 1), else ""."""
    return f", cp {rep['cp_index']}" if "cp_index" in rep else ""


def summary_line(rep: dict[str, Any]) -> str:
    """One line per rank: stage, layers, seconds per category, busy and bubble fractions, memory."""
    t = rep["timeline"]["totals"]
    a, b = rep.get("layers", (0, 0))
    ms = {k: round(t[k] * 1000) for k in ("wall", *CATEGORIES)}
    return (f"rank {rep['rank']} (stage {rep.get('stage', 0)}, tp {rep.get('tp_index', 0)}{_cp(rep)}, "
            f"layers {a}..{b - 1}): wall {ms['wall']} ms = compute {ms['compute']} + send {ms['send']} "
            f"+ recv {ms['recv']} + idle {ms['idle']} ms | busy {t['busy']:.0%} bubble {t['bubble']:.0%} | "
            f"weights {rep.get('weight_mb', 0):.0f} MB, KV {rep.get('kv_mb', 0):.1f} MB, "
            f"peak RSS {rep.get('peak_rss_mb', 0):.0f} MB")
