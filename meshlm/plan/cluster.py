"""Cluster description: nodes of identical devices, the links inside a node and between nodes; presets.

Units inside are SI (bytes, seconds, FLOP/s, bytes/s). Files (YAML or JSON) use human units: memory_gib,
reserved_gib, tflops per dtype, bandwidth_gbs (GB/s; one number, or one per dtype), latency_us:

    name: 2x8xH100
    nodes: 2
    node:
      devices: 8
      device: {name: H100-SXM-80GB, memory_gib: 80, tflops: {bfloat16: 989, float32: 67},
               bandwidth_gbs: 3350, reserved_gib: 2, layer_overhead_us: 20, step_overhead_us: 1000}
      links: [{transport: nvlink, bandwidth_gbs: 370, latency_us: 1}]
    inter: {transport: infiniband, bandwidth_gbs: 45, latency_us: 10}

A link is alpha-beta: a message of n bytes takes latency + n / bandwidth. A node may list several links
(one per transport, the first is the default): a CPU host has shared memory (shm) and gloo over TCP.
On a CPU host (`shared_memory: true`) a "device" is one core: its matmul rate and bandwidth are one
thread's, the ranks of a layout share the node's memory and its cores (each rank gets cores // ranks
threads, as meshlm's default), `memory_bandwidth_gbs` caps the node's total streaming rate (one process
per core reading at once), and `thread_scaling` is the share of linear bandwidth scaling one process reaches
with every core as a thread (decode GEMVs; 1.0 when threads scale as processes do). `host_read_gbs` (optional)
is the rate one rank reads cold experts from host memory (--expert-budget misses; measured: the expert
buffer's fetch seconds, docs/expert_parallelism.md).
`meshlm plan --calibrate` writes this host's file (the "local" cluster) in this same format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from meshlm.errors import ConfigError

PCIE_BYTES_S = 25e9  # host -> GPU copies, PCIe 4.0 x16 as achieved (the host_read default of a GPU node)
GIB = 2**30
PROFILE_ENV = "MESHLM_CLUSTER_PROFILE"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Link:
    """One transport: a message of n bytes costs latency + n / bandwidth seconds."""

    transport: str
    bandwidth: float  # bytes/s per device, one direction
    latency: float  # seconds per message (alpha)

    def time(self, nbytes: float) -> float:
        """Seconds for one message of nbytes."""
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Device:
    """One rank's device (a CPU host: one core): memory, peak matmul rate and bandwidth per dtype, overheads."""

    name: str
    memory: float  # bytes (a CPU host: the whole host's memory, shared by its ranks)
    flops: dict[str, float]  # peak dense matmul FLOP/s per dtype name
    bandwidth: dict[str, float]  # bytes/s streamed from memory per dtype (decode-shaped reads of weights)
    compute_eff: float = 0.6  # achieved fraction of peak in large matmuls (1.0 when measured)
    bandwidth_eff: float = 0.8  # achieved fraction of peak bandwidth (1.0 when measured)
    attention_eff: float = 0.7  # attention kernels' FLOP rate as a fraction of the achieved matmul rate
    memory_utilization: float = 0.9  # fraction of memory meshlm may plan to use
    reserved: float = 0.0  # bytes the runtime takes per rank (CUDA context, allocator, Python + torch)
    layer_overhead: float = 0.0  # seconds per decoder layer per forward beyond its math (dispatch, Python)
    step_overhead: float = 0.0  # seconds per engine step beyond the forward (scheduling, sampling)
    # A sparse MoE layer's calls beyond their bytes, on top of layer_overhead (which counts a dense MLP's):
    moe_overhead: float = 0.0  # seconds per MoE layer per forward (router, softmax, top-k, the combine's setup)
    expert_overhead: float = 0.0  # seconds per expert the layer runs (index, 3 matmul calls, SiLU, index_add)
    # the same at ep > 1 (parallel/expert.py: counts, sorts, load statistics, the combine; collectives apart)
    ep_moe_overhead: float = 0.0
    ep_expert_overhead: float = 0.0  # per expert the rank runs

    def rate(self, dtype: str) -> float:
        """Achieved matmul FLOP/s in dtype."""
        if dtype not in self.flops:
            raise ConfigError(f"device {self.name!r} has no matmul rate for {dtype}; it lists "
                              f"{', '.join(self.flops)}. Add tflops.{dtype} to the cluster file or pick "
                              f"--dtype {next(iter(self.flops))}.")
        return self.flops[dtype] * self.compute_eff

    def stream(self, dtype: str) -> float:
        """Achieved bytes/s reading weights of dtype (the dtype's own figure, else the first listed)."""
        return self.bandwidth.get(dtype, next(iter(self.bandwidth.values()))) * self.bandwidth_eff


@dataclass(frozen=True)
class Node:
    """A machine of `devices` identical devices and its intra-node links (the first is the default)."""

    devices: int
    device: Device
    links: tuple[Link, ...]
    shared_memory: bool = False  # ranks of this node share device.memory (a CPU host)
    memory_bandwidth: float | None = None  # bytes/s the whole node streams at most (None: no cap)
    # One process's streaming rate with all `devices` cores as threads, over `devices` x one thread's (CPU
    # hosts; 1.0: linear). Threads of one rank share its GEMVs' fork and join; processes do not.
    thread_scaling: float = 1.0
    # bytes/s one rank reads cold experts from host memory (--expert-budget misses); None: a CPU host reads the
    # memory-mapped checkpoint at its streaming rate, a GPU node over PCIe at PCIE_BYTES_S
    host_read: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.thread_scaling <= 1:
            raise ConfigError(f"node.thread_scaling must be in (0, 1], got {self.thread_scaling}.")

    def link(self, transport: str | None = None) -> Link:
        """The named intra-node link, or the default."""
        if transport is None:
            return self.links[0]
        for ln in self.links:
            if transport.startswith(ln.transport) or ln.transport.startswith(transport):
                return ln
        raise ConfigError(f"this cluster's nodes have no {transport!r} link; they list "
                          f"{', '.join(ln.transport for ln in self.links)}.")


@dataclass(frozen=True)
class Cluster:
    """`nodes` identical nodes joined by `inter` (None for one node)."""

    name: str
    nodes: int
    node: Node
    inter: Link | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # where the numbers came from

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.node.devices < 1:
            raise ConfigError(f"cluster {self.name!r} needs at least one node of one device.")
        if self.nodes > 1 and self.inter is None:
            raise ConfigError(f"cluster {self.name!r} has {self.nodes} nodes but no `inter` link; describe "
                              "the network between nodes (bandwidth_gbs, latency_us).")
        if not self.node.links:
            raise ConfigError(f"cluster {self.name!r}: a node needs at least one link in `links`.")

    @property
    def devices(self) -> int:
        """Devices in the whole cluster."""
        return self.nodes * self.node.devices

    def node_of(self, rank: int) -> int:
        """The node rank `rank` runs on: r // devices per node (on one node every rank, even past its devices)."""
        return 0 if self.nodes == 1 else rank // self.node.devices

    def ranks_on_node(self, world: int) -> int:
        """Ranks of a `world`-rank layout that share one node (more than its devices when oversubscribed)."""
        return world if self.nodes == 1 else min(self.node.devices, world)

    def link_between(self, ranks: list[int], transport: str | None = None) -> Link:
        """The slowest link a group of ranks crosses."""
        if len({self.node_of(r) for r in ranks}) > 1:
            assert self.inter is not None
            return self.inter
        return self.node.link(transport)

    def with_transport(self, transport: str) -> Cluster:
        """The same cluster with `transport` as its nodes' default link."""
        first = self.node.link(transport)
        rest = tuple(ln for ln in self.node.links if ln is not first)
        return replace(self, node=replace(self.node, links=(first, *rest)))


def _link_from(d: dict[str, Any]) -> Link:
    return Link(str(d.get("transport", "link")), float(d["bandwidth_gbs"]) * 1e9, float(d["latency_us"]) * 1e-6)


def _sig(x: float) -> float:
    """x to 5 significant digits: a file a person reads, and saving what was loaded changes nothing."""
    return float(f"{x:.5g}")


def _link_dict(ln: Link) -> dict[str, Any]:
    return {"transport": ln.transport, "bandwidth_gbs": _sig(ln.bandwidth / 1e9), "latency_us": _sig(ln.latency * 1e6)}


def _per_dtype(value: Any) -> dict[str, float]:
    """bandwidth_gbs: one number (every dtype) or {dtype: GB/s} -> {dtype: bytes/s}."""
    if isinstance(value, dict):
        return {str(k): float(v) * 1e9 for k, v in value.items()}
    return {k: float(value) * 1e9 for k in DTYPES}


def from_dict(d: dict[str, Any]) -> Cluster:
    """Build a Cluster from the file format (human units)."""
    try:
        n, dev = d["node"], d["node"]["device"]
        device = Device(
            name=str(dev.get("name", "device")), memory=float(dev["memory_gib"]) * GIB,
            flops={k: float(v) * 1e12 for k, v in dev["tflops"].items()},
            bandwidth=_per_dtype(dev["bandwidth_gbs"]), compute_eff=float(dev.get("compute_eff", 0.6)),
            bandwidth_eff=float(dev.get("bandwidth_eff", 0.8)),
            attention_eff=float(dev.get("attention_eff", 0.7)),
            memory_utilization=float(dev.get("memory_utilization", 0.9)),
            reserved=float(dev.get("reserved_gib", 0.0)) * GIB,
            layer_overhead=float(dev.get("layer_overhead_us", 0)) * 1e-6,
            step_overhead=float(dev.get("step_overhead_us", 0)) * 1e-6,
            moe_overhead=float(dev.get("moe_overhead_us", 0)) * 1e-6,
            expert_overhead=float(dev.get("expert_overhead_us", 0)) * 1e-6,
            ep_moe_overhead=float(dev.get("ep_moe_overhead_us", 0)) * 1e-6,
            ep_expert_overhead=float(dev.get("ep_expert_overhead_us", 0)) * 1e-6)
        cap, host = n.get("memory_bandwidth_gbs"), n.get("host_read_gbs")
        node = Node(int(n["devices"]), device, tuple(_link_from(x) for x in n["links"]),
                    bool(n.get("shared_memory", False)), float(cap) * 1e9 if cap else None,
                    float(n.get("thread_scaling", 1.0)), float(host) * 1e9 if host else None)
        inter = _link_from(d["inter"]) if d.get("inter") else None
        return Cluster(str(d.get("name", "cluster")), int(d.get("nodes", 1)), node, inter,
                       dict(d.get("notes", {})))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"cluster description is missing or has a bad field ({e!r}); see "
                          "meshlm/plan/cluster.py for the format (node.devices, node.device.memory_gib, "
                          "tflops, bandwidth_gbs, node.links, inter).") from None


def to_dict(c: Cluster) -> dict[str, Any]:
    """The file format of a Cluster (human units)."""
    dev = c.node.device
    gbs = {k: _sig(v / 1e9) for k, v in dev.bandwidth.items()}
    out: dict[str, Any] = {"name": c.name, "nodes": c.nodes, "node": {
        "devices": c.node.devices, "shared_memory": c.node.shared_memory,
        "device": {"name": dev.name, "memory_gib": _sig(dev.memory / GIB),
                   "tflops": {k: _sig(v / 1e12) for k, v in dev.flops.items()},
                   "bandwidth_gbs": next(iter(gbs.values())) if len(set(gbs.values())) == 1 else gbs,
                   "compute_eff": dev.compute_eff, "bandwidth_eff": dev.bandwidth_eff,
                   "attention_eff": _sig(dev.attention_eff), "memory_utilization": dev.memory_utilization,
                   "reserved_gib": _sig(dev.reserved / GIB), "layer_overhead_us": _sig(dev.layer_overhead * 1e6),
                   "step_overhead_us": _sig(dev.step_overhead * 1e6),
                   "moe_overhead_us": _sig(dev.moe_overhead * 1e6),
                   "expert_overhead_us": _sig(dev.expert_overhead * 1e6),
                   "ep_moe_overhead_us": _sig(dev.ep_moe_overhead * 1e6),
                   "ep_expert_overhead_us": _sig(dev.ep_expert_overhead * 1e6)},
        "links": [_link_dict(ln) for ln in c.node.links]}}
    if c.node.memory_bandwidth:
        out["node"]["memory_bandwidth_gbs"] = _sig(c.node.memory_bandwidth / 1e9)
    if c.node.host_read:
        out["node"]["host_read_gbs"] = _sig(c.node.host_read / 1e9)
    if c.node.thread_scaling != 1.0:
        out["node"]["thread_scaling"] = _sig(c.node.thread_scaling)
    if c.inter is not None:
        out["inter"] = _link_dict(c.inter)
    if c.notes:
        out["notes"] = c.notes
    return out


# MoE call overheads on a GPU (not measured: estimated from the MoE layer's eager ops at the dense layer's
# ~1 us a launch, plus the device syncs its Python loop takes: unique().tolist() per layer, nonzero per expert)
_GPU_MOE = {"moe_overhead_us": 30.0, "expert_overhead_us": 25.0, "ep_moe_overhead_us": 120.0,
            "ep_expert_overhead_us": 30.0}


def _gpu(name: str, gib: float, bf16: float, fp32: float, gbs: float) -> dict[str, Any]:
    return {"name": name, "memory_gib": gib, "tflops": {"bfloat16": bf16, "float16": bf16, "float32": fp32},
            "bandwidth_gbs": gbs, "reserved_gib": 2.0, "layer_overhead_us": 20.0,
            "step_overhead_us": 1000.0, **_GPU_MOE}


_NVLINK = {"transport": "nvlink", "bandwidth_gbs": 370.0, "latency_us": 1.0}  # NVLink 4: NCCL bus rate
_IB = {"transport": "infiniband", "bandwidth_gbs": 45.0, "latency_us": 10.0}  # one 400 Gb/s NIC per GPU
_H100 = _gpu("H100-SXM-80GB", 80, 989, 67, 3350)
_CPU = {"name": "cpu-core", "memory_gib": 128, "tflops": {"float32": 0.1, "bfloat16": 0.05},
        "bandwidth_gbs": 14.0, "compute_eff": 1.0, "bandwidth_eff": 1.0, "attention_eff": 0.35,
        "reserved_gib": 0.5, "layer_overhead_us": 350.0, "step_overhead_us": 1500.0,
        # calibrate.moe_overhead on the development host (AMD EPYC, one thread, 2026-12-07), rounded
        "moe_overhead_us": 20.0, "expert_overhead_us": 37.0, "ep_moe_overhead_us": 180.0,
        "ep_expert_overhead_us": 45.0}
PRESETS: dict[str, dict[str, Any]] = {
    "8xH100": {"name": "8xH100", "nodes": 1, "node": {"devices": 8, "device": _H100, "links": [_NVLINK]}},
    "2x8xH100": {"name": "2x8xH100", "nodes": 2, "node": {"devices": 8, "device": _H100, "links": [_NVLINK]},
                 "inter": _IB},
    "8xL40S-pcie": {"name": "8xL40S-pcie", "nodes": 1, "node": {
        "devices": 8, "device": _gpu("L40S-48GB", 48, 362, 91.6, 864),
        "links": [{"transport": "pcie", "bandwidth_gbs": 20.0, "latency_us": 15.0}]}},
    "4xRTX4090-pcie": {"name": "4xRTX4090-pcie", "nodes": 1, "node": {
        "devices": 4, "device": _gpu("RTX4090-24GB", 24, 165, 82.6, 1008),
        "links": [{"transport": "pcie-host", "bandwidth_gbs": 12.0, "latency_us": 25.0}]}},
    "cpu-host": {"name": "cpu-host", "nodes": 1, "node": {
        "devices": 16, "device": _CPU, "shared_memory": True, "memory_bandwidth_gbs": 100.0,
        "links": [{"transport": "shm", "bandwidth_gbs": 5.0, "latency_us": 10.0},
                  {"transport": "gloo", "bandwidth_gbs": 1.5, "latency_us": 80.0}]}},
}


def profile_path() -> Path:
    """Where `meshlm plan --calibrate` saves this machine's profile ($MESHLM_CLUSTER_PROFILE overrides)."""
    env = os.environ.get(PROFILE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "meshlm" / "cluster-local.yaml"


def save(c: Cluster, path: str | Path) -> Path:
    """Write a cluster description as YAML (JSON when the name ends in .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".json":
        path.write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
    else:
        path.write_text(json.dumps(to_dict(c), indent=1) + "\n")
    return path


def load_file(path: str | Path) -> Cluster:
    """Read a JSON or YAML cluster description."""
    path = Path(path)
    text = path.read_text()
    try:
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds no cluster description (a mapping with name, nodes, node, inter).")
    return from_dict(d)


def host_cores() -> int:
    """Cores this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def uncalibrated_local(cores: int | None = None, memory: float | None = None) -> Cluster:
    """This host as a cpu-host with one rank per core, before `meshlm plan --calibrate` measured it."""
    cores = cores or host_cores()
    if memory is None:
        try:
            memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            memory = 16 * GIB
    d = json.loads(json.dumps(PRESETS["cpu-host"]))
    d.update(name="local (uncalibrated)", notes={"source": "defaults; run `meshlm plan --calibrate`"})
    d["node"].update(devices=cores)
    d["node"]["device"]["memory_gib"] = memory / GIB
    return from_dict(d)


def resolve(spec: str | None) -> Cluster:
    """A preset name, a file path, or 'local' (the saved calibration, else this host's defaults)."""
    if spec in (None, "local"):
        path = profile_path()
        return load_file(path) if path.exists() else uncalibrated_local()
    if spec in PRESETS:
        return from_dict(PRESETS[spec])
    if Path(spec).exists():
        return load_file(spec)
    raise ConfigError(f"--cluster {spec!r} is neither a preset ({', '.join(PRESETS)}, local) nor a file; "
                      "name a preset or a JSON/YAML cluster description.")
