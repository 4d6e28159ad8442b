"""The host's state now, against its state when the profile was calibrated: live rescaling of a profile.

A CPU host shared with work we cannot see (a VM's vCPUs) runs in faster and slower states: the planner
host's GEMV bandwidth moved 10.4-15.0 GB/s between layouts minutes apart, its matmul rate 100-145 GFLOP/s
between calibrations. A profile taken in one state mispredicts runs taken in the other. So calibration keeps
a short reading of the host (`read_host`: one thread's GEMV rate over a 512 MB pool and one thread's
prefill-shaped matmul rate, ~0.5 s of timing each) in the profile's notes ("host_reading"), and a bench
reads the same probe again beside its runs (before the engine starts, after it stops; their mean): `rescale`
multiplies the profile's bandwidths (per rank and the node's cap) by bandwidth now / at calibration and its
matmul rates (every dtype; attention follows, being a fraction of them) by matmul rate now / at calibration.
Software overheads, links, waits and slows are left as calibrated. Optional: `meshlm bench --no-rescale`,
`benchmarks/planner.py --no-rescale`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from meshlm.plan.cluster import Cluster

GEMV_MB = 512  # the GEMV probe's pool: calibrate.gemv_bandwidth's
MATMUL_MB = 64  # the matmul probe's pool: smaller than calibrate.matmul_rate's (the probe is cheap)


@dataclass(frozen=True)
class HostReading:
    """One short reading of the host: one thread's GEMV bandwidth (bytes/s) and matmul rate (FLOP/s);
    0 where not read."""

    bandwidth: float
    matmul: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Human units, as in the profile's notes."""
        return {"bandwidth_gbs": self.bandwidth / 1e9, "matmul_gflops": self.matmul / 1e9}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> HostReading:
        """The inverse of as_dict."""
        return HostReading(float(d.get("bandwidth_gbs", 0.0)) * 1e9, float(d.get("matmul_gflops", 0.0)) * 1e9)


@dataclass(frozen=True)
class Scale:
    """Factors applied to a profile: bandwidth-bound terms x `bandwidth`, compute-bound terms x `matmul`."""

    bandwidth: float = 1.0
    matmul: float = 1.0

    def text(self) -> str:
        """'bandwidth x0.93, matmul x1.05'."""
        return f"bandwidth x{self.bandwidth:.2f}, matmul x{self.matmul:.2f}"


def host_bandwidth(seconds: float = 0.5) -> float:
    """Bytes/s of one thread's decode-shaped GEMVs over calibrate.gemv_bandwidth's 512 MB pool."""
    from meshlm.plan.calibrate import gemv_meter

    return gemv_meter(1, GEMV_MB)(seconds)


def host_matmul(seconds: float = 0.5) -> float:
    """FLOP/s of one thread's prefill-shaped fp32 matmul (calibrate.matmul_rate's shape, weights cycled)."""
    from meshlm.plan.calibrate import matmul_meter

    return matmul_meter(1, MATMUL_MB)(seconds)


def read_host(seconds: float = 0.5) -> HostReading:
    """Both probes, `seconds` of timing each (plus allocating their pools: ~1-2 s in all). The probes run
    on one thread; the caller's intra-op thread count is restored after."""
    import torch

    threads = torch.get_num_threads()
    try:
        return HostReading(host_bandwidth(seconds), host_matmul(seconds))
    finally:
        torch.set_num_threads(threads)


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
