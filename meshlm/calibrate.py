"""Measure this host and describe it as a cluster file (`meshlm plan --calibrate`): the "local" cluster.

A device is one core (one thread); the file is the one a user could write by hand (plan/cluster.py):
  matmul rate   per dtype: prefill-shaped F.linear [256, 1024] x [1024, 3584] on one thread, weights
                cycled from a pool larger than the last-level cache (a forward reads each weight once)
  attention     causal SDPA of 12 heads x 256 tokens x 64, as a fraction of the matmul rate
  bandwidth     per dtype: decode-shaped GEMVs (one row) over the pool on one thread; the node's cap:
                the same GEMVs in one one-thread process per core at once; thread scaling: the same GEMVs
                on every core as threads of one process, over cores x one thread
  overhead      one tiny decoder layer's forward on one token (hidden 64: almost no arithmetic), the
                per-layer cost of dispatch and Python; the per-step overhead stays the cpu-host preset's
  MoE overhead  a tiny random Mixtral's sparse MoE layer (hidden 64, 8 experts) at top-1 and top-2 on 1 .. 16
                tokens, less its weight bytes at the measured bandwidth: fixed + per expert run, a least-squares
                line over the experts each routing runs; the fixed part less a dense MLP's (layer_overhead has it);
                again with the experts behind parallel/expert.py's dispatch and combine on a group of one (ep > 1's
                bookkeeping: counts, sorts, load statistics; its collectives are priced as links)
  links         two ranks all-reduce 3 KB .. 4 MB over each transport (shm, gloo), each call after a GEMV
                over cold weights (as between two collectives of a decode step); the median per size, fitted by
                relative least squares to the ring's 2(p-1) alpha + 2(p-1)/p n / beta.
Lives beside plan/ (which stays torch-free) and imports torch, models/ and parallel/, never engine/ or serve/.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshlm.plan import cluster as clusters
from meshlm.plan.cluster import Cluster, Device, Link, Node

log = logging.getLogger(__name__)
SIZES = (768, 16384, 262144, 1048576)  # fp32 elements: 3 KB (a decode step's hidden row) .. 4 MB
DTYPES = ("float32", "bfloat16")


def _timed(fn: Callable[[], Any], seconds: float, min_reps: int = 3) -> float:
    """Median seconds per call of fn over about `seconds` (after one warm-up call)."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pool(rows: int, cols: int, megabytes: int, dtype: str) -> list:
    """Random matrices [rows, cols] of about `megabytes` in all (more than the caches hold: cold reads)."""
    import torch

    n = max(2, (megabytes << 20) // (rows * cols * torch.tensor([], dtype=getattr(torch, dtype)).element_size()))
    return [torch.randn(rows, cols).to(getattr(torch, dtype)) for _ in range(n)]


def matmul_rate(dtype: str, megabytes: int, seconds: float) -> float:
    """FLOP/s of a prefill-shaped matmul on one thread, weights read cold."""
    import torch

    mats = _pool(3584, 1024, megabytes, dtype)
    a = torch.randn(256, 1024).to(getattr(torch, dtype))
    sec = _timed(lambda: [torch.nn.functional.linear(a, w) for w in mats], seconds)
    return 2 * 256 * 1024 * 3584 * len(mats) / sec


def stream_rate(dtype: str, megabytes: int, seconds: float, ready: Callable[[], Any] | None = None) -> float:
    """Bytes/s of weights streamed by decode-shaped GEMVs ([1, 2048] x [2048, 4096]) on torch's threads;
    `ready` is called once the pool is built, right before the timing."""
    import torch

    mats = _pool(4096, 2048, megabytes, dtype)
    x = torch.randn(1, 2048).to(getattr(torch, dtype))
    if ready is not None:
        ready()
    sec = _timed(lambda: [torch.nn.functional.linear(x, w) for w in mats], seconds)
    return sum(w.numel() * w.element_size() for w in mats) / sec


def _stream_process(megabytes: int, seconds: float, barrier: Any, out: Any) -> None:
    import torch

    torch.set_num_threads(1)
    out.put(stream_rate("float32", megabytes, seconds, lambda: barrier.wait(timeout=300)))


def node_stream_rate(procs: int, megabytes: int, seconds: float) -> float:
    """Bytes/s the node streams with `procs` one-thread processes reading fp32 weights at once (its cap)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_stream_process, args=(megabytes, seconds, barrier, out), daemon=True)
               for _ in range(procs)]
    for w in workers:
        w.start()
    try:
        return sum(out.get(timeout=600) for _ in workers)
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()


def attention_fraction(seconds: float) -> float:
    """Causal attention's FLOP rate over the matmul rate (CPU SDPA runs well below its matmuls)."""
    import torch

    q, k, v = (torch.randn(1, 12, 256, 64) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sec = _timed(lambda: sdpa(q, k, v, is_causal=True), seconds)
    a, b = torch.randn(256, 768), torch.randn(768, 768)
    mm = _timed(lambda: torch.nn.functional.linear(a, b), seconds)
    return (4 * 12 * 64 * 256 * 257 / 2 / sec) / (2 * 256 * 768 * 768 / mm)


def layer_overhead(seconds: float, keys: int = 16) -> float:
    """Median seconds of one tiny decoder layer's forward on one token over `keys` cached keys."""
    import torch

    from meshlm.config import ModelConfig
    from meshlm.models.layers import apply_rope, rope_cos_sin, rope_inv_freq, sdpa
    from meshlm.models.llama import Block

    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                               "vocab_size": 256, "num_hidden_layers": 1, "max_position_embeddings": 512,
                               "rms_norm_eps": 1e-5})
    block = Block(cfg, 0).eval()
    kv = torch.randn(2, 1, cfg.num_kv_heads, keys, cfg.head_dim)  # [2, B, Hkv, T, D]
    d = cfg.head_dim

    def attn(_, q, k, v, cos, sin):  # q [1, 1, Hq*D] -> [1, 1, Hq*D] over the cached keys
        q = apply_rope(q.view(1, 1, -1, d), cos, sin)
        return sdpa(q.transpose(1, 2), kv[0], kv[1], None).transpose(1, 2).reshape(1, 1, -1)

    x = torch.randn(1, 1, cfg.hidden_size)  # [B, S, H]
    cos, sin = rope_cos_sin(rope_inv_freq(cfg.rope, cfg.head_dim), torch.tensor([[keys]]), x.dtype)
    with torch.inference_mode():
        return _timed(lambda: block(x, x, cos, sin, attn), seconds, min_reps=20)


def fit_moe_overhead(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, per expert) seconds: the least-squares line through (experts run, seconds) samples, both >= 0."""
    if len({x for x, _ in samples}) < 2:
        raise ValueError("fitting a per-expert cost needs samples that run at least two different expert counts.")
    n = len(samples)
    mx, my = sum(x for x, _ in samples) / n, sum(y for _, y in samples) / n
    per = sum((x - mx) * (y - my) for x, y in samples) / sum((x - mx) ** 2 for x, _ in samples)
    per = max(per, 0.0)
    return max(my - per * mx, 0.0), per


def moe_overhead(seconds: float, bandwidth: float, expert_parallel: bool = False) -> tuple[float, float]:
    """(seconds per MoE layer, per expert run) of a tiny random Mixtral's sparse MoE layer beyond its weight bytes
    at `bandwidth` and beyond a dense MLP's calls (layer_overhead has those): top-1 and top-2 at 1 .. 16 tokens,
    the experts each run counted from its routing, fitted by fit_moe_overhead. expert_parallel: the layer's
    experts behind parallel/expert.py's dispatch and combine on a group of one (its bookkeeping; no collective)."""
    import torch

    from meshlm.config import ModelConfig
    from meshlm.models.llama import MLP
    from meshlm.models.mixtral import SparseMoE, route
    from meshlm.parallel.comm import Comm, CommStats
    from meshlm.parallel.expert import ExpertLoad, Placement, make_expert_parallel

    h, inter, experts = 64, 96, 8
    torch.manual_seed(0)
    samples: list[tuple[float, float]] = []
    with torch.inference_mode():
        for k in (1, 2):
            cfg = ModelConfig.from_hf({"architectures": ["MixtralForCausalLM"], "hidden_size": h,
                                       "intermediate_size": inter, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "vocab_size": 256, "num_hidden_layers": 1, "max_position_embeddings": 512,
                                       "num_local_experts": experts, "num_experts_per_tok": k, "rms_norm_eps": 1e-5})
            moe = SparseMoE(cfg).eval()
            for p in moe.parameters():
                p.normal_(0, 0.1)
            if expert_parallel:
                make_expert_parallel(moe.experts, Comm("ep", [0], None, 0, stats=CommStats()),
                                     Placement.contiguous(experts, 1), 0, ExpertLoad())
            for n in (1, 2, 4, 8, 16):
                x = torch.randn(1, n, h)  # [B, S, H]
                run = len(torch.unique(route(moe.router.forward(x.view(n, h)), k, True)[1]))
                sec = _timed(lambda: moe(x), seconds, min_reps=20)  # noqa: B023 (timed before x changes)
                samples.append((run, sec - (run * 3 * h * inter + h * experts) * 4 / bandwidth))
        mlp = MLP(h, inter).eval()
        for p in mlp.parameters():
            p.normal_(0, 0.1)
        x = torch.randn(1, 1, h)
        dense = _timed(lambda: mlp(x), seconds, min_reps=20)
    fixed, per = fit_moe_overhead(samples)
    return max(fixed - dense, 0.0), per


def fit_link(transport: str, times: dict[int, float], p: int = 2) -> Link:
    """Alpha and beta of the ring all-reduce model from {bytes: seconds} (relative least squares)."""
    xs = sorted(times.items())
    # minimise sum(((a + b n) / t - 1)^2): normal equations in (a, b) with weights 1/t^2
    s11 = sum(1 / t**2 for _, t in xs)
    s12 = sum(n / t**2 for n, t in xs)
    s22 = sum(n * n / t**2 for n, t in xs)
    r1 = sum(1 / t for _, t in xs)
    r2 = sum(n / t for n, t in xs)
    det = s11 * s22 - s12 * s12
    a, b = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    a, b = max(a, 1e-7), max(b, 1e-13)
    return Link(transport, bandwidth=2 * (p - 1) / (p * b), latency=a / (2 * (p - 1)))


def _all_reduce_times(rv: Any, quick: bool) -> dict[str, dict[int, float]]:
    """On every rank: median seconds of an all-reduce per (transport, bytes), each after a little compute."""
    import torch

    from meshlm.errors import ConfigError
    from meshlm.parallel.comm import build_groups
    from meshlm.parallel.launch import init_distributed, shutdown_distributed
    from meshlm.parallel.mesh import ParallelDims

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_distributed(rv)
    try:
        h, pool = torch.randn(1, 2048), _pool(768, 2048, 48 if quick else 192, "float32")
        out: dict[str, dict[int, float]] = {}
        built = []
        for transport in ("shm", "gloo"):
            try:
                groups = build_groups(ParallelDims(tp=rv.world_size), rv.rank, "gloo", rv.timeout_s, transport)
            except ConfigError as e:  # no shared memory on this host
                log.info("transport %s unavailable: %s", transport, e)
                continue
            built.append(groups)
            comm = groups.tp
            for n in SIZES:
                x, times = torch.zeros(n), []
                comm.barrier()
                for i in range((20 if quick else 60) if n <= 16384 else (6 if quick else 12)):
                    torch.nn.functional.linear(h, pool[i % len(pool)])  # cold weights: a decode step's segment
                    t0 = time.perf_counter()
                    comm.all_reduce(x)
                    times.append(time.perf_counter() - t0)
                out.setdefault(comm.transport, {})[n * 4] = statistics.median(times[2:])
        for groups in built:
            groups.world.barrier()
            groups.close()  # unmap the shared-memory segments
        return out
    finally:
        shutdown_distributed()
        torch.set_num_threads(threads)


def _serve_rank(rv: Any, quick: bool) -> None:
    _all_reduce_times(rv, quick)


def collective_links(quick: bool, timeout_s: float = 120.0) -> tuple[list[Link], dict[str, dict[int, float]]]:
    """Links fitted from all-reduce timings between this process and one spawned rank, fastest first."""
    from meshlm.parallel.launch import LocalRanks

    ranks = LocalRanks(2, functools.partial(_serve_rank, quick=quick), "gloo", timeout_s)
    try:
        raw = _all_reduce_times(ranks.rendezvous(2, "gloo", timeout_s), quick)
    except Exception as e:
        raise ranks.error(e) from e
    finally:
        ranks.shutdown()
    links = [fit_link(t, m) for t, m in raw.items()]
    return sorted(links, key=lambda ln: ln.latency), raw


def _rss_bytes() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.5 * 2**30


def calibrate(quick: bool = False) -> Cluster:
    """Measure this host: one node of one device per core, its links and overheads; notes say how long."""
    import torch

    t0 = time.perf_counter()
    cores = clusters.host_cores()
    base = clusters.uncalibrated_local(cores)
    mb, sec = (48, 0.2) if quick else (256, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        flops = {d: matmul_rate(d, mb, sec) for d in DTYPES}
        log.info("matmul rates measured at %.1f s", time.perf_counter() - t0)
        streams = {d: stream_rate(d, mb, sec) for d in DTYPES}
        log.info("bandwidths measured at %.1f s", time.perf_counter() - t0)
        attn = attention_fraction(sec / 2)
        per_layer = layer_overhead(sec / 2)
        moe = moe_overhead(sec / 10, streams["float32"])
        ep_moe = moe_overhead(sec / 10, streams["float32"], expert_parallel=True)
        torch.set_num_threads(cores)
        threaded = stream_rate("float32", mb, sec) if cores > 1 else streams["float32"]
        log.info("attention, layer overhead and threaded bandwidth measured at %.1f s", time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    scaling = min(1.0, threaded / (cores * streams["float32"]))
    node_bw = node_stream_rate(cores, max(32, mb // max(1, cores // 2)), sec) if cores > 1 else None
    log.info("node bandwidth (%d processes) measured at %.1f s", cores, time.perf_counter() - t0)
    links, raw = collective_links(quick) if cores > 1 else (list(base.node.links), {})
    log.info("links measured at %.1f s", time.perf_counter() - t0)
    preset = base.node.device
    dev = Device(name="cpu-core", memory=preset.memory, flops=flops, bandwidth=streams, compute_eff=1.0,
                 bandwidth_eff=1.0, attention_eff=attn, memory_utilization=preset.memory_utilization,
                 reserved=_rss_bytes(), layer_overhead=per_layer, step_overhead=preset.step_overhead,
                 moe_overhead=moe[0], expert_overhead=moe[1], ep_moe_overhead=ep_moe[0],
                 ep_expert_overhead=ep_moe[1])
    notes = {"source": "measured by `meshlm plan --calibrate`" + (" --quick" if quick else ""),
             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": _cpu_name(), "cores": cores,
             "step_overhead": "the cpu-host preset's (not measured)",
             "allreduce_median_us": {t: {str(n): round(s * 1e6, 1) for n, s in v.items()} for t, v in raw.items()},
             "seconds": round(time.perf_counter() - t0, 1)}
    node = Node(cores, dev, tuple(links), shared_memory=True, memory_bandwidth=node_bw, thread_scaling=scaling)
    return Cluster("local", 1, node, None, notes)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def summary(c: Cluster, path: Path) -> str:
    """What calibration measured, in human units, and where it saved it."""
    d = c.node.device
    per_dtype = lambda xs, unit, k: ", ".join(f"{n} {v / k:.1f} {unit}" for n, v in xs.items())
    links = "; ".join(f"{ln.transport}: alpha {ln.latency * 1e6:.1f} us, beta {ln.bandwidth / 1e9:.2f} GB/s"
                      for ln in c.node.links)
    cap = f"{c.node.memory_bandwidth / 1e9:.1f} GB/s" if c.node.memory_bandwidth else "n/a"
    return (f"calibrated {c.node.devices} cores in {c.notes.get('seconds')} s, saved to {path}\n"
            f"  matmul per core: {per_dtype(d.flops, 'GFLOP/s', 1e9)}\n"
            f"  memory bandwidth per core: {per_dtype(d.bandwidth, 'GB/s', 1e9)}; node {cap} (a process per "
            f"core); one process's threads reach {c.node.thread_scaling:.2f} of linear\n"
            f"  attention: {d.attention_eff:.2f} x the matmul rate; {d.layer_overhead * 1e6:.0f} us per layer\n"
            f"  MoE layer: {d.moe_overhead * 1e6:.0f} us + {d.expert_overhead * 1e6:.0f} us per expert run; at ep > 1 "
            f"{d.ep_moe_overhead * 1e6:.0f} us + {d.ep_expert_overhead * 1e6:.0f} us\n"
            f"  links: {links}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """`meshlm plan --calibrate`: measure, save the local cluster file, print what was measured."""
    c = calibrate(quick=args.quick)
    path = clusters.save(c, args.out or clusters.profile_path())
    print(json.dumps(clusters.to_dict(c), indent=1) if args.json else summary(c, path))
    return 0
