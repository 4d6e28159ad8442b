"""Measure this machine and describe it as a cluster: `meshlm plan --calibrate`.

One device = one rank with `threads` intra-op threads (one node; devices = cores this process may use //
threads). The whole calibration refuses to save when other processes took more than `max_load` of the
CPUs while it ran (load.other_load): a profile taken under load is slow by that load.
  matmul rate     fp32: prefill-shaped F.linear [256, 1024] x [1024, 3584], weights cycled from a pool
                  larger than the last-level cache (as a forward reads each weight once), at the host's
                  median state (paired_rates, below); bf16: rounds until two agree within `tol` (settle)
  attention       causal SDPA of 12 heads x 256 tokens x 64, as a fraction of the matmul rate
  bandwidth       decode-shaped GEMVs (one row) over 512 MB of weights: one rank alone (at the median
                  state), and the node's total with every rank streaming at once (they start together
                  after a barrier)
  host reading    the host's state moves within seconds (host.py), so the fp32 matmul rate and the GEMV
                  bandwidth are measured in 5 rounds, each beside a short host.HostProbe reading: the
                  profile keeps the median reading as its reference (notes["host_reading"], what a bench
                  sets its own readings against) and each rate at that state (median of rate / reading
                  beside it, x the reference). Later measurements are read around too (host.beside_run)
                  and set against the state then: the node's bandwidth x reference / then, and the
                  residuals below (overhead, in-engine compute beyond the roofline, pipeline layer)
                  against the roofline at the rates of then
  overhead        meshlm's own seconds per layer and per step (overhead.py: small random models)
  links           two spawned ranks all-reduce 3 KB .. 4 MB over each transport (shared memory, gloo),
                  each call after a GEMV over cold weights as in a decode step; the mean (top 2% of calls
                  dropped) per size, because a step pays every call, tails included. t(n) = a + b n is
                  fitted by relative least squares and read as the ring's 2(p-1) alpha + 2(p-1)/p n / beta.
  hop             gloo ping-pong of a pipeline hop's messages (a header, then a 3 KB payload): one way
  in-engine       probe.py: the extra wait per all-reduce inside tp=2 steps and the compute between two
                  all-reduces beyond the roofline (per transport), and the per-layer cost of a pp=2
                  stage, timed through meshlm.LLM
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshlm.plan.cluster import Cluster, Device, Link, Node
from meshlm.plan.load import check_load, other_load, settle

log = logging.getLogger(__name__)
SIZES = (768, 16384, 262144, 1048576)  # fp32 elements: 3 KB (a decode step's hidden row) .. 4 MB


def _timed(fn, seconds: float, min_reps: int = 3) -> float:
    """Median seconds per call of fn over about `seconds` (after one warm-up call)."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pool(rows: int, cols: int, megabytes: int, dtype: str = "float32") -> list:
    """Random matrices [rows, cols] totalling about `megabytes` (more than the cache holds: cold reads)."""
    import torch

    n = max(2, (megabytes << 20) // (rows * cols * 4))
    return [torch.randn(rows, cols).to(getattr(torch, dtype)) for _ in range(n)]


def matmul_meter(threads: int, megabytes: int, dtype: str = "float32") -> Callable[[float], float]:
    """seconds -> FLOP/s of a prefill-shaped matmul ([256, 1024] x [1024, 3584]) on `threads` threads,
    cycling through `megabytes` of weights (read cold); the pool is built once, each call times again."""
    import torch

    torch.set_num_threads(threads)
    mats = _pool(3584, 1024, megabytes, dtype)
    a = torch.randn(256, 1024).to(getattr(torch, dtype))
    sweep = lambda: [torch.nn.functional.linear(a, w) for w in mats]
    return lambda seconds: 2 * 256 * 1024 * 3584 * len(mats) / _timed(sweep, seconds)


def matmul_rate(threads: int, dtype: str = "float32", quick: bool = False, tol: float = 0.05) -> float:
    """FLOP/s of a prefill-shaped matmul on `threads` threads, weights read cold."""
    meter = matmul_meter(threads, 32 if quick else 320, dtype)
    rate = lambda: meter(0.2 if quick else 1.0)
    return rate() if quick else settle(rate, f"the {dtype} matmul rate", tol)


def attention_fraction(threads: int, quick: bool = False) -> float:
    """Causal attention's FLOP rate over the matmul rate (CPU SDPA runs well below its matmuls)."""
    import torch

    torch.set_num_threads(threads)
    q, k, v = (torch.randn(1, 12, 256, 64) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sec = _timed(lambda: sdpa(q, k, v, is_causal=True), 0.1 if quick else 0.5)
    a, b = torch.randn(256, 768), torch.randn(768, 768)
    mm = _timed(lambda: torch.nn.functional.linear(a, b), 0.1 if quick else 0.5)
    return (4 * 12 * 64 * 256 * 257 / 2 / sec) / (2 * 256 * 768 * 768 / mm)


def gemv_meter(threads: int, megabytes: int) -> Callable[[float], float]:
    """seconds -> bytes/s streamed by decode-shaped GEMVs ([1, 2048] x [2048, 4096]) on `threads` threads
    over `megabytes` of weights; the pool is built once, each call times again."""
    import torch

    torch.set_num_threads(threads)
    mats = _pool(4096, 2048, megabytes)
    x = torch.randn(1, 2048)
    sweep = lambda: [torch.nn.functional.linear(x, w) for w in mats]
    return lambda seconds: len(mats) * 4096 * 2048 * 4 / _timed(sweep, seconds)


PAIRS = 5  # (host reading, measurement) pairs behind the fp32 matmul rate and the GEMV bandwidth


def at_median(values: list[float], beside: list[float], readings: list[float]) -> tuple[float, float]:
    """(the measured quantity at the host's median state, that median reading): median(value / the reading
    beside it) x median(readings). A reading caught in a dip moves neither (a single one would move both)."""
    ref = statistics.median(readings)
    return statistics.median(v / r for v, r in zip(values, beside)) * ref, ref


def paired_rates(threads: int, host: Any, quick: bool = False, pairs: int = PAIRS) -> tuple[float, float, Any]:
    """(fp32 matmul FLOP/s, GEMV bytes/s, the reference host.HostReading): both at the host's median state.
    The host moves between a fast and a slow state within seconds, so each full measurement (the
    prefill-shaped matmul over 320 MB of weights, 1 s; decode-shaped GEMVs over 512 MB, 1.5 s) is paired
    with the short reading (`host`, a HostProbe) taken right before the matmul or right after the GEMVs, in
    `pairs` rounds (1 with `quick`); at_median combines them."""
    from meshlm.plan.host import HostReading

    mm, gemv = matmul_meter(threads, 32 if quick else 320), gemv_meter(threads, 32 if quick else 512)
    reads, mms, bws = [host.read()], [], []
    for _ in range(1 if quick else pairs):
        mms.append(mm(0.2 if quick else 1.0))
        bws.append(gemv(0.3 if quick else 1.5))
        reads.append(host.read())
    rate, ref_mm = at_median(mms, [r.matmul for r in reads[:-1]], [r.matmul for r in reads])
    bw, ref_bw = at_median(bws, [r.bandwidth for r in reads[1:]], [r.bandwidth for r in reads])
    log.info("paired rates: matmul %s GFLOP/s, GEMV %s GB/s, readings %s", [round(x / 1e9, 1) for x in mms],
             [round(x / 1e9, 2) for x in bws], [(round(r.bandwidth / 1e9, 1), round(r.matmul / 1e9)) for r in reads])
    return rate, bw, HostReading(ref_bw, ref_mm)


def _stream_worker(threads: int, quick: bool, start: Any, out: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    mats = _pool(4096, 2048, 32 if quick else 512)
    x = torch.randn(1, 2048)
    for w in mats:  # warm up, then start together
        torch.nn.functional.linear(x, w)
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < (0.5 if quick else 2.0):
        for w in mats:
            torch.nn.functional.linear(x, w)
        n += 1
    out.put(n * len(mats) * 4096 * 2048 * 4 / (time.perf_counter() - t0))


def node_bandwidth(devices: int, threads: int, quick: bool = False, rounds: int = 2) -> float:
    """Total bytes/s when every device streams at once (the memory system's cap); best of rounds."""
    ctx = mp.get_context("spawn")
    best = 0.0
    for _ in range(1 if quick else rounds):
        start, out = ctx.Barrier(devices), ctx.Queue()
        procs = [ctx.Process(target=_stream_worker, args=(threads, quick, start, out))
                 for _ in range(devices)]
        for p in procs:
            p.start()
        best = max(best, sum(_results(out, procs, len(procs), 300.0)))
        for p in procs:
            p.join()
    return best


def _results(out: Any, procs: list, n: int, timeout: float) -> list:
    """`n` results from queue `out`, which `procs` fill; raises as soon as one of them has died (or all
    have exited short of `n`) instead of waiting out `timeout` (seconds in all)."""
    import queue

    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            got.append(out.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        dead = any(p.exitcode not in (None, 0) for p in procs)
        done = all(p.exitcode == 0 for p in procs) and out.empty()
        late = time.monotonic() > deadline
        if dead or done or late:
            codes = ", ".join(f"pid {p.pid} exit {p.exitcode}" for p in procs)
            for p in procs:  # the survivors would wait for the dead one at a barrier
                if p.is_alive():
                    p.terminate()
            if late and not (dead or done):
                raise TimeoutError(f"calibration workers gave {len(got)} of {n} results in {timeout:.0f} s")
            raise RuntimeError(f"a calibration worker exited before reporting ({codes})")
    return got


def _trimmed_mean(xs: list[float], drop: float = 0.02) -> float:
    s = sorted(xs)
    return statistics.fmean(s[: max(1, int(len(s) * (1 - drop)))])


def _collective_rank(rank: int, world: int, port: int, quick: bool, out: Any) -> None:
    """One rank: mean all-reduce seconds per (transport, bytes), each call after a cold GEMV."""
    import torch
    import torch.distributed as dist

    from meshlm.parallel.comm import build_groups
    from meshlm.parallel.launch import die_with_parent
    from meshlm.parallel.mesh import ParallelDims

    die_with_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dims = ParallelDims(tp=world)
    comms = {}
    for t in ("shm", "gloo"):
        try:
            comm = build_groups(dims, rank, "gloo", 60.0, transport=t).tp
        except Exception as e:  # an older comm.py without transports, or no shared memory here
            log.info("transport %s unavailable: %s", t, e)
            continue
        comms.setdefault(comm.transport, comm)
    if not comms:
        comms["gloo"] = build_groups(dims, rank, "gloo", 60.0).tp
    mats = _pool(768, 2048, 48 if quick else 320)  # a decode step's segment between two all-reduces
    h = torch.randn(1, 2048)
    result: dict[str, dict[Any, float]] = {}

    def timed(comm: Any, x: Any, reps: int) -> float:
        times = []
        comm.barrier()
        for i in range(reps):
            torch.nn.functional.linear(h, mats[i % len(mats)])
            t0 = time.perf_counter()
            comm.all_reduce(x)
            times.append(time.perf_counter() - t0)
        return _trimmed_mean(times[2:])

    for name, comm in comms.items():
        for n in SIZES:
            reps = (30 if quick else 300) if n <= 16384 else (8 if quick else 60)
            result.setdefault(name, {})[n * 4] = timed(comm, torch.zeros(n), reps)
    result.setdefault("gloo", {})["hop"] = ping_pong(rank, 30 if quick else 300)
    if rank == 0:
        out.put(result)
    dist.barrier()
    dist.destroy_process_group()


def ping_pong(rank: int, reps: int) -> float:
    """One-way seconds of a pipeline hop between ranks 0 and 1 over gloo: a header, then a 3 KB payload
    (pipeline_stage.py sends a header before each payload), there and back; the median round trip / 2."""
    import torch
    import torch.distributed as dist

    header, payload, trips = torch.zeros(3, dtype=torch.long), torch.zeros(768), []
    peer = 1 - rank
    dist.barrier()
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        for t in ((header, payload) if rank == 0 else ()):
            dist.send(t, peer)
        for t in (header, payload):
            dist.recv(t, peer)
        for t in ((header, payload) if rank == 1 else ()):
            dist.send(t, peer)
        trips.append(time.perf_counter() - t0)
    return statistics.median(trips[2:]) / 2


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


def collective_links(quick: bool = False, world: int = 2) -> tuple[list[Link], dict[str, dict[Any, float]]]:
    """Links fitted from all-reduce timings between `world` spawned ranks, fastest first; the raw means."""
    from meshlm.parallel.launch import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_collective_rank, args=(r, world, port, quick, out)) for r in range(world)]
    for p in procs:
        p.start()
    (raw,) = _results(out, procs, 1, 600.0)
    for p in procs:
        p.join(timeout=60)
    links = []
    for t, m in raw.items():
        sizes = {n: s for n, s in m.items() if isinstance(n, int)}
        if sizes:
            links.append(replace(fit_link(t, sizes, world), hop=m.get("hop", 0.0)))
    return sorted(links, key=lambda ln: ln.latency), raw


def _rss_bytes() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.5 * 2**30


def calibrate(threads: int = 1, quick: bool = False, tol: float = 0.05, max_load: float = 0.2) -> Cluster:
    """Measure this host: one node of cores // threads devices, its links, its memory; refuse (ConfigError)
    when other processes used more than `max_load` of the CPUs meanwhile."""
    from meshlm.plan.cluster import host_cores, uncalibrated_local
    from meshlm.plan.host import HostProbe, beside_run
    from meshlm.plan.overhead import software_overhead
    from meshlm.plan.probe import probe

    devices = max(1, host_cores() // threads)
    base = uncalibrated_local(devices)
    t0 = time.perf_counter()
    with other_load() as load:
        host = HostProbe(0.2 if quick else 0.5)
        mm32, bw, ref = paired_rates(threads, host, quick)  # ref: the state bench readings are set against
        flops = {"float32": mm32}
        if not quick:
            flops["bfloat16"] = matmul_rate(threads, "bfloat16", quick, tol)
        attn = attention_fraction(threads, quick)
        then = lambda fn: beside_run(host, ref, fn)
        node_bw = bw
        if devices > 1:  # the node's cap at the reference state: measured / the state it was measured in
            node_bw, now = then(lambda: node_bandwidth(devices, threads, quick))
            node_bw /= now.bandwidth
        per_layer, per_step = software_overhead(threads, quick, bw, then=then)
        links, raw = collective_links(quick) if devices > 1 else ([base.node.link()], {})
        dev = Device(name=f"cpu-rank-{threads}t", memory=base.node.device.memory, flops=flops, bandwidth=bw,
                     compute_eff=1.0, bandwidth_eff=1.0, attention_eff=attn, memory_utilization=0.9,
                     reserved=_rss_bytes(), layer_overhead=per_layer, step_overhead=per_step)
        node = Node(devices, dev, tuple(links), shared_memory=True,
                    memory_bandwidth=node_bw if devices > 1 else None)
        c = Cluster("local", 1, node, None)
        if devices > 1 and threads == 1:  # the engine's probes run 2 ranks of 1 thread
            got = probe(c, quick, then=then)
            dev = replace(dev, pipeline_layer_overhead=got.pipeline_layer)
            node = replace(node, device=dev, links=tuple(replace(ln, waits=got.waits.get(ln.transport, ()),
                                                                 slows=got.slows.get(ln.transport, ()))
                                                         for ln in node.links))
    check_load(load[0], max_load)
    notes = {"source": "measured by `meshlm plan --calibrate`" + (" --quick" if quick else ""),
             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads_per_rank": threads, "host": _cpu_name(),
             "cores": host_cores(), "other_load": round(load[0], 3),
             "allreduce_mean_us": {t: {str(n): s * 1e6 for n, s in v.items()} for t, v in raw.items()},
             "seconds": round(time.perf_counter() - t0, 1), "host_reading": ref.as_dict()}
    return Cluster("local", 1, node, None, notes)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
