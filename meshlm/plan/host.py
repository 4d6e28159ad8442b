"""The host's state now, against its state when the profile was calibrated: live rescaling of a profile.

A CPU host shared with work we cannot see (a VM's vCPUs) runs in faster and slower states: the planner
host's GEMV bandwidth moved 10.4-15.0 GB/s between layouts minutes apart (and within seconds), its matmul
rate 100-145 GFLOP/s between calibrations. A profile taken in one state mispredicts runs taken in the other.
So calibration keeps a reading of the host (`HostProbe`: one thread's GEMV rate over a 512 MB pool and one
thread's prefill-shaped matmul rate, ~0.5 s of timing each; the median of the readings around its rate
measurements, calibrate.paired_rates) in the profile's notes ("host_reading"), reads it around its later
measurements (`beside_run`), and a bench reads the same probe again (its pools built once) before the
engine starts, right before every timed run (the other ranks idle then: they sleep on the control channel)
and after the engine stops. Each phase is predicted from the readings beside its own runs (`beside`: those taken before
its runs, and the next one after its last run), since the state moves within a layout's minute of runs:
`rescale` multiplies the profile's bandwidths (per rank and the node's cap) by bandwidth now / at
calibration and its matmul rates (every dtype; attention follows, being a fraction of them) by matmul
rate now / at calibration.
Software overheads, links, waits and slows are left as calibrated. Optional: `meshlm bench --no-rescale`,
`benchmarks/planner.py --no-rescale`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from meshlm.plan.cluster import Cluster

T = TypeVar("T")
GEMV_MB = 512  # the GEMV probe's pool: calibrate.paired_rates's
MATMUL_MB = 64  # the matmul probe's pool: smaller than calibrate.paired_rates' (the probe is cheap)


@dataclass(frozen=True)
class HostReading:
    """One short reading of the host: one thread's GEMV bandwidth (bytes/s) and matmul rate (FLOP/s);
    0 where not read."""

    bandwidth: float
    matmul: float = 0.0
    at: str = ""  # when a bench took it: "start", before a "prefill" or "decode" run, "end"

    def as_dict(self) -> dict[str, Any]:
        """Human units, as in the profile's notes."""
        d: dict[str, Any] = {"bandwidth_gbs": self.bandwidth / 1e9, "matmul_gflops": self.matmul / 1e9}
        return {**d, "at": self.at} if self.at else d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> HostReading:
        """The inverse of as_dict."""
        return HostReading(float(d.get("bandwidth_gbs", 0.0)) * 1e9, float(d.get("matmul_gflops", 0.0)) * 1e9,
                           str(d.get("at", "")))


@dataclass(frozen=True)
class Scale:
    """Factors applied to a profile: bandwidth-bound terms x `bandwidth`, compute-bound terms x `matmul`."""

    bandwidth: float = 1.0
    matmul: float = 1.0

    def text(self) -> str:
        """'bandwidth x0.93, matmul x1.05'."""
        return f"bandwidth x{self.bandwidth:.2f}, matmul x{self.matmul:.2f}"


class HostProbe:
    """Both probes with their pools built once (~0.6 GB, 1-2 s, at the first read): `read` then costs
    2 x `seconds`. The probes run on one thread; the caller's intra-op thread count is restored after."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds
        self._meters: tuple[Callable[[float], float], Callable[[float], float]] | None = None

    def read(self, at: str = "") -> HostReading:
        """One reading, labelled `at`."""
        import torch

        from meshlm.plan.calibrate import gemv_meter, matmul_meter

        threads = torch.get_num_threads()
        try:
            if self._meters is None:
                self._meters = gemv_meter(1, GEMV_MB), matmul_meter(1, MATMUL_MB)
            gemv, matmul = self._meters
            torch.set_num_threads(1)
            return HostReading(gemv(self.seconds), matmul(self.seconds), at)
        finally:
            torch.set_num_threads(threads)


def beside_run(probe: HostProbe | None, ref: HostReading | None, fn: Callable[[], T]) -> tuple[T, Scale]:
    """fn() between two readings of the host, and the host's state then against `ref` (scale_of their mean;
    x1 without a probe). Calibration uses it to set a residual (a measurement less the roofline at the
    profile's rates) against the rates the host ran at while it was measured, not at `ref`'s."""
    if probe is None:
        return fn(), Scale()
    before = probe.read()
    out = fn()
    return out, scale_of(ref, mean([before, probe.read()]))


Then = Callable[[Callable[[], Any]], tuple[Any, Scale]]  # fn -> (fn(), the host's state while it ran)


def as_calibrated(fn: Callable[[], T]) -> tuple[T, Scale]:
    """A Then that reads nothing: fn() at the profile's state (x1)."""
    return beside_run(None, None, fn)


def read_host(seconds: float = 0.5) -> HostReading:
    """One reading by a fresh HostProbe (allocating its pools: ~1-2 s more)."""
    return HostProbe(seconds).read()


def beside(readings: list[HostReading], phase: str) -> list[HostReading]:
    """The readings beside `phase`'s runs: those taken right before them, and the next one after the last
    (before the other phase's first run, or at the end); all of them when none is labelled (older runs)."""
    idx = [i for i, r in enumerate(readings) if r.at == phase]
    if not idx:
        return list(readings)
    return readings[idx[0]: idx[-1] + 2]


def mean(readings: list[HostReading]) -> HostReading:
    """The mean of readings (each quantity over the readings that have it)."""
    pick = lambda f: statistics.fmean([x for x in map(f, readings) if x > 0] or [0.0])
    return HostReading(pick(lambda r: r.bandwidth), pick(lambda r: r.matmul))


def reference(cluster: Cluster) -> HostReading | None:
    """The reading the profile's calibration kept (notes["host_reading"]), or None (an older or preset profile)."""
    d = cluster.notes.get("host_reading")
    return HostReading.from_dict(d) if isinstance(d, dict) else None


def scale_of(ref: HostReading | None, now: HostReading | None) -> Scale:
    """now / ref per quantity; 1 for a quantity either side lacks."""
    if ref is None or now is None:
        return Scale()
    ratio = lambda a, b: a / b if a > 0 and b > 0 else 1.0
    return Scale(ratio(now.bandwidth, ref.bandwidth), ratio(now.matmul, ref.matmul))


def rescale(cluster: Cluster, s: Scale) -> Cluster:
    """The profile as the host runs now: bandwidths x s.bandwidth, matmul rates x s.matmul."""
    node, dev = cluster.node, cluster.node.device
    dev = replace(dev, bandwidth=dev.bandwidth * s.bandwidth, flops={k: v * s.matmul for k, v in dev.flops.items()})
    cap = node.memory_bandwidth * s.bandwidth if node.memory_bandwidth else node.memory_bandwidth
    notes = {**cluster.notes, "scale": {"bandwidth": s.bandwidth, "matmul": s.matmul}}
    return replace(cluster, node=replace(node, device=dev, memory_bandwidth=cap), notes=notes)
