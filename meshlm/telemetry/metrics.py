"""Prometheus text-format metrics: counters, gauges and histograms with labels, thread-safe, no dependencies.

A Registry renders every metric it holds in the text exposition format (version 0.0.4) that Prometheus
scrapes: `# HELP`, `# TYPE`, then one sample per line; histograms as cumulative `_bucket{le=...}` lines
plus `_sum` and `_count`. Metrics are updated from any thread (one lock each).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    """Shared parts: name, help, label names, one value per label tuple."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], float] = {}

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def samples(self) -> list[tuple[str, tuple[str, ...], float]]:
        """(suffix, label values, value) for every sample."""
        with self._lock:
            return [("", k, v) for k, v in sorted(self._values.items())]

    def render(self) -> str:
        """HELP, TYPE and sample lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for suffix, key, value in self.samples():
            lines.append(f"{self.name}{suffix}{_labels(self.label_names, key)} {_fmt(value)}")
        return "\n".join(lines)


class Counter(_Metric):
    """A value that only goes up (name should end in _total)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add amount (>= 0)."""
        if amount < 0:
            raise ValueError("a counter cannot decrease")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, value: float, **labels: str) -> None:
        """Mirror a total kept elsewhere (it must not decrease)."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = max(self._values.get(key, 0.0), value)

    def get(self, **labels: str) -> float:
        """Current value."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)


class Gauge(_Metric):
    """A value that goes up and down; or read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help, labels)
        self.fn = fn

    def set(self, value: float, **labels: str) -> None:
        """Set the value."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def get(self, **labels: str) -> float:
        """Current value."""
        if self.fn is not None:
            return float(self.fn())
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[tuple[str, tuple[str, ...], float]]:
        """The callback's value, or every set value."""
        if self.fn is not None:
            return [("", (), float(self.fn()))]
        return super().samples()


class Histogram(_Metric):
    """Observations counted into cumulative buckets (upper bounds `le`), with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help, ())
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += 1
            self.sum += value
            self.count += 1

    def samples(self) -> list[tuple[str, tuple[str, ...], float]]:
        """Cumulative buckets, then sum and count."""
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        out, running = [], 0
        for bound, c in zip((*self.bounds, math.inf), counts):
            running += c
            out.append(("_bucket", (_fmt(bound),), float(running)))
        return out + [("_sum", (), total), ("_count", (), float(n))]

    def render(self) -> str:
        """HELP, TYPE, buckets (le label), sum and count."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for suffix, key, value in self.samples():
            labels = _labels(("le",), key) if suffix == "_bucket" else ""
            lines.append(f"{self.name}{suffix}{labels} {_fmt(value)}")
        return "\n".join(lines)


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self.metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        """Register a metric (names are unique)."""
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        """Register and return a Counter."""
        return self.add(Counter(name, help, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labels: Iterable[str] = (),
              fn: Callable[[], float] | None = None) -> Gauge:
        """Register and return a Gauge."""
        return self.add(Gauge(name, help, labels, fn))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
        """Register and return a Histogram."""
        return self.add(Histogram(name, help, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        """The whole registry in the text exposition format (ends with a newline)."""
        return "\n".join(m.render() for m in self.metrics.values()) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """Samples of a text exposition as {"name{labels}": value} (for tests and load scripts)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
