"""Cost model: rooflines, alpha-beta collectives, the engine's pipeline schedule, a CPU host's threads;
calibration's alpha-beta fit."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_plan_memory import LLAMA3_8B, cfg

from meshlm.calibrate import fit_link
from meshlm.config import SamplingParams
from meshlm.engine.kv_cache import BlockManager
from meshlm.engine.request import Request
from meshlm.engine.scheduler import Scheduler, SchedulerConfig
from meshlm.parallel.partition import auto_chunks
from meshlm.plan import cluster as clusters
from meshlm.plan.cost import Model, Pass, all_gather, all_reduce, broadcast, estimate
from meshlm.plan.layout import Layout, Workload, rank_shares

LINK = clusters.Link("test", bandwidth=10e9, latency=20e-6)


def ideal(cluster: clusters.Cluster) -> clusters.Cluster:
    """The cluster with no software overhead (rooflines and activation traffic only)."""
    dev = replace(cluster.node.device, layer_overhead=0.0, step_overhead=0.0)
    return replace(cluster, node=replace(cluster.node, device=dev))


def test_alpha_beta_collectives():
    """Ring all-reduce 2(p-1)a + 2(p-1)/p n/b; all-gather half that; nothing for a group of one."""
    n = 1 << 20
    assert all_reduce(LINK, 2, n) == pytest.approx(2 * 20e-6 + n / 10e9)
    assert all_reduce(LINK, 8, n) == pytest.approx(14 * 20e-6 + 14 / 8 * n / 10e9)
    assert all_gather(LINK, 4, n) == pytest.approx(3 * 20e-6 + 3 / 4 * n / 10e9)
    assert broadcast(LINK, 4, n) == pytest.approx(2 * (20e-6 + n / 10e9))
    assert all_reduce(LINK, 1, n) == all_gather(LINK, 1, n) == broadcast(LINK, 1, n) == 0.0


def test_decode_streams_the_weights():
    """Batch-1 decode on one H100: weights / achieved bandwidth (plus a little KV and head)."""
    c = ideal(clusters.resolve("8xH100"))
    model = cfg(LLAMA3_8B)
    est = estimate(model, Layout(8, 1, 1), c, Workload(prompt_tokens=16, output_tokens=2), "bfloat16")
    bw = 3350e9 * 0.8
    assert est.decode.bound == "bandwidth"
    assert est.decode.total == pytest.approx((model.num_params() - 128256 * 4096) * 2 / bw, rel=0.01)


def test_prefill_is_compute_bound():
    """A 2,048-token prompt: matmuls + causal attention at their rates, activation passes at bandwidth."""
    c = ideal(clusters.resolve("8xH100"))
    model = cfg(LLAMA3_8B)
    est = estimate(model, Layout(8, 1, 1), c, Workload(prompt_tokens=2048, output_tokens=1), "bfloat16")
    rate, bw, t, layers = 989e12 * 0.6, 3350e9 * 0.8, 2048, 32
    body = model.num_params() - 2 * 128256 * 4096  # the layers; the head runs for the sampled row only
    matmuls = 2 * (body - layers * 2 * 4096 - 4096) * t / rate  # norm weights are not matmuls
    attention = 4 * 32 * 128 * (t * (t + 1) / 2) * layers / (rate * 0.7)
    passes = t * layers * (18 * 4096 + 5 * 14336 + 8 * 48 * 128) * 2 / bw
    head = 128256 * 4096 * 2 / bw  # one sampled row: the head streams
    assert est.prefill.bound == "compute"
    assert est.prefill.compute == pytest.approx(matmuls + attention + passes + head, rel=1e-6)
    assert matmuls / est.prefill.compute > 0.75


def test_tensor_parallel_collectives_per_step():
    """tp=2 decode: 2 all-reduces per layer + the embedding's, and the logits' all-gather."""
    c = ideal(clusters.resolve("8xH100"))
    model = cfg(LLAMA3_8B)
    est = estimate(model, Layout(4, 1, 2), c, Workload(prompt_tokens=16, output_tokens=2), "bfloat16")
    link = c.node.link()
    want = 65 * all_reduce(link, 2, 4096 * 2) + all_gather(link, 2, 128256 * 4)
    assert est.decode.collectives == pytest.approx(want)


def test_pipeline_decode_models_the_engines_steps_in_flight():
    """pp=2: one sequence pays the whole trip (both stages and both hops); four run as two groups of two,
    one per stage, so TPOT = max(2 x the slowest stage, the trip)."""
    c = ideal(clusters.resolve("8xH100"))
    model = cfg(LLAMA3_8B)
    m = Model(model, Layout(4, 2, 1), c, "bfloat16")
    one = m.decode(Workload(prompt_tokens=16, output_tokens=2, batch=1))
    t = [m.stage(s, Pass(1, 17, 17, 1), 1).total for s in range(2)]
    assert one.total == pytest.approx(sum(t) + m.hop(0, 1, 1) + m.hop(1, 1, 1))
    assert one.factor == pytest.approx(sum(t) / max(t)) and one.bubble == pytest.approx(min(t))
    four = m.decode(Workload(prompt_tokens=16, output_tokens=2, batch=4))
    t4 = [m.stage(s, Pass(2, 34, 34, 2), 2).total for s in range(2)]
    assert four.total == pytest.approx(max(2 * max(t4), sum(t4) + m.hop(0, 2, 2) + m.hop(1, 2, 2)))
    assert four.pieces == 2 and four.total < 2 * one.total


@pytest.mark.parametrize("pp", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_groups_match_the_schedulers_split(pp, batch):
    """The model's (groups in flight, rows per group) is what the engine's scheduler plans for a batch
    arriving together with pp steps in flight."""
    sched = Scheduler(SchedulerConfig(), BlockManager(256, 16))
    for i in range(batch):
        sched.add(Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4), max_new=4))
    sizes = []
    for _ in range(pp):
        plan = sched.schedule(pp)  # the requests of the steps planned before are in flight
        if not plan.items:
            break
        sizes.append(len(plan.items))
    m = Model(cfg(LLAMA3_8B), Layout(1, pp, 1), clusters.resolve("8xH100"), "bfloat16")
    assert m.groups(batch) == (len(sizes), max(sizes))


def test_pipelined_prefill_follows_the_fill_drain_equation():
    """n steps over S stages: sum of stage times + (n - 1) x the slowest + hops."""
    c = ideal(clusters.resolve("8xH100"))
    m = Model(cfg(LLAMA3_8B), Layout(4, 2, 1), c, "bfloat16")
    w = Workload(prompt_tokens=1024, output_tokens=1, batch=1, prefill_chunks=4)
    pre = m.prefill(w)
    piece = Pass(256, 1024 * 1025 / 2 / 4, 256, 0.25)
    t = [m.stage(s, piece, 2).total for s in range(2)]
    assert pre.total == pytest.approx(sum(t) + 3 * max(t) + m.hop(0, 256, 0.25) + m.hop(1, 256, 0.25))
    assert pre.factor == pytest.approx((sum(t) + 3 * max(t)) / max(t))
    # two prompts at pp=2, unchunked: one step each (two groups of one), pipelined
    two = m.prefill(Workload(prompt_tokens=512, output_tokens=1, batch=2, prefill_chunks=1))
    t2 = [m.stage(s, Pass(512, 512 * 513 / 2, 512, 1), 2).total for s in range(2)]
    assert two.pieces == 2 and two.total == pytest.approx(sum(t2) + max(t2) + m.hop(0, 512, 1) + m.hop(1, 512, 1))
    # by default each prompt is cut as the engine cuts it: auto_chunks(512, pp=2) = 4 chunks of >= 128 tokens
    assert m.prefill(Workload(prompt_tokens=512, output_tokens=1, batch=2)).pieces == 2 * auto_chunks(512, 2, 1, 128)


def test_uneven_shards_take_the_slowest_rank():
    """9 heads at tp=2: the stage's time is rank 0's (6 heads)."""
    odd = replace(cfg(LLAMA3_8B), num_heads=36, num_kv_heads=12, head_dim=128)
    c = ideal(clusters.resolve("8xH100"))
    m = Model(odd, Layout(4, 1, 2), c, "bfloat16")
    shares = rank_shares(odd, Layout(4, 1, 2), "bfloat16")
    assert shares[0].q_heads == 18 and shares[1].q_heads == 18  # 12 KV groups split 6 + 6
    m3 = Model(odd, Layout(1, 1, 5), c, "bfloat16")
    assert m3.stage(0, Pass(1, 1, 1, 1), 5).compute >= m.stage(0, Pass(1, 1, 1, 1), 2).compute * 2 / 5


def test_cpu_host_ranks_share_cores_and_bandwidth():
    """A CPU host's rank runs cores // ranks threads: one rank streams with all 16 cores up to the node's
    cap, 16 ranks get a 16th of it each; 4 ranks on 2 cores time-share them (twice as long)."""
    host = clusters.resolve("cpu-host")
    small = cfg({**LLAMA3_8B, "num_hidden_layers": 2})
    one, sixteen = Model(small, Layout(1, 1, 1), host, "float32"), Model(small, Layout(1, 1, 16), host, "float32")
    assert one.threads == 16 and one.rates(1).bandwidth == pytest.approx(100e9)
    assert one.rates(1).matmul == pytest.approx(16 * 0.1e12)
    assert sixteen.threads == 1 and sixteen.rates(16).bandwidth == pytest.approx(100e9 / 16)
    two = replace(host, node=replace(host.node, devices=2))
    four = Model(small, Layout(1, 2, 2), two, "float32")
    assert four.threads == 1 and four.slowdown(4) == 2.0 and four.slowdown(2) == 1.0
    assert estimate(small, Layout(1, 1, 1), two, Workload(), "float32").per_device == pytest.approx(
        estimate(small, Layout(1, 1, 1), two, Workload(), "float32").throughput / 2)  # both cores used


def test_threads_of_one_rank_stream_as_the_node_measured():
    """thread_scaling < 1: one rank's 2 threads stream less than 2 one-thread ranks, whose share of the node's
    cap (one process per core) is what bounds them; the file keeps the figure."""
    host = clusters.resolve("cpu-host")
    two = replace(host, node=replace(host.node, devices=2, memory_bandwidth=28e9, thread_scaling=0.5))
    small = cfg({**LLAMA3_8B, "num_hidden_layers": 2})
    per_core = two.node.device.stream("float32")
    tp1, tp2 = Model(small, Layout(1, 1, 1), two, "float32"), Model(small, Layout(1, 1, 2), two, "float32")
    assert tp1.threads == 2 and tp1.rates(1).bandwidth == pytest.approx(min(2 * per_core * 0.5, 28e9))
    assert tp2.threads == 1 and tp2.rates(2).bandwidth == pytest.approx(min(per_core, 14e9))
    assert clusters.from_dict(clusters.to_dict(two)).node.thread_scaling == 0.5
    with pytest.raises(clusters.ConfigError, match="thread_scaling"):
        replace(two.node, thread_scaling=0.0)


def test_fit_link_recovers_alpha_and_beta():
    """Timings made from a = 2 alpha, b = 1 / beta (p = 2) give alpha and beta back."""
    alpha, beta = 80e-6, 2e9
    times = {n: 2 * alpha + n / beta for n in (3072, 65536, 1 << 20, 4 << 20)}
    link = fit_link("gloo", times, p=2)
    assert link.latency == pytest.approx(alpha, rel=1e-6) and link.bandwidth == pytest.approx(beta, rel=1e-6)


def test_control_message_takes_the_tp_transport():
    """pp=1 with tp > 1 broadcasts each step's input over the tp group's transport: one shared-memory
    message, or two gloo broadcasts (size, then payload)."""
    host = clusters.resolve("cpu-host")
    small = cfg({**LLAMA3_8B, "num_hidden_layers": 2, "vocab_size": 1024})
    work = Workload(prompt_tokens=16, output_tokens=2)
    shm = Model(small, Layout(tp=2), host, "float32").control(1)
    gloo = Model(small, Layout(tp=2), host.with_transport("gloo"), "float32").control(1)
    assert shm == pytest.approx(broadcast(host.node.link("shm"), 2, 256 + 8))
    assert gloo == pytest.approx(2 * broadcast(host.node.link("gloo"), 2, 256 + 8))
    assert estimate(small, Layout(tp=2), host, work, "float32").decode.control == pytest.approx(shm)
