"""Cost model: rooflines, alpha-beta collectives, pipeline bubbles; calibration's alpha-beta fit."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_plan_memory import LLAMA3_8B, cfg

from meshlm.plan import cluster as clusters
from meshlm.plan.calibrate import fit_link
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


def test_collectives_pay_their_in_engine_wait():
    """Link.wait reads the line through the in-engine points (two points: w = 50 us + 0.1 x segment, on
    either side of them too); every tp collective of a step pays it."""
    link = replace(LINK, waits=((0.5e-3, 0.1e-3), (10.5e-3, 1.1e-3)))
    assert link.wait(0.2e-3) == pytest.approx(0.07e-3) and link.wait(5.5e-3) == pytest.approx(0.6e-3)
    assert link.wait(50e-3) == pytest.approx(5.05e-3) and LINK.wait(1.0) == 0.0
    c = ideal(clusters.resolve("8xH100"))
    skewed = replace(c, node=replace(c.node, links=(replace(c.node.link(), waits=((1e-6, 1e-3),)),)))
    model = cfg(LLAMA3_8B)
    work = Workload(prompt_tokens=16, output_tokens=2)
    plain = estimate(model, Layout(4, 1, 2), c, work, "bfloat16").decode.collectives
    assert estimate(model, Layout(4, 1, 2), skewed, work, "bfloat16").decode.collectives == pytest.approx(
        plain + 66 * 1e-3)  # 65 all-reduces and the logits' all-gather, each waiting the full 1 ms


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


def test_pipeline_bubbles():
    """pp=2, one sequence: TPOT = both stages + both hops (factor 2); two sequences fill the pipe."""
    c = ideal(clusters.resolve("8xH100"))
    model = cfg(LLAMA3_8B)
    m = Model(model, Layout(4, 2, 1), c, "bfloat16")
    one = m.decode(Workload(prompt_tokens=16, output_tokens=2, batch=1))
    t = [m.stage(s, Pass(1, 17, 17, 1)).total for s in range(2)]
    hops = m.hop(0, 1) + m.hop(1, 1)
    assert one.total == pytest.approx(sum(t) + hops)
    assert one.factor == pytest.approx(sum(t) / max(t)) and one.bubble == pytest.approx(min(t))
    two = m.decode(Workload(prompt_tokens=16, output_tokens=2, batch=2))
    assert two.bubble < one.bubble and two.total < 2 * one.total


def test_pipelined_prefill_follows_the_fill_drain_equation():
    """n pieces over S stages: sum of stage times + (n - 1) x the slowest + hops."""
    c = ideal(clusters.resolve("8xH100"))
    m = Model(cfg(LLAMA3_8B), Layout(4, 2, 1), c, "bfloat16")
    w = Workload(prompt_tokens=1024, output_tokens=1, batch=1, prefill_chunks=4)
    pre = m.prefill(w)
    piece = Pass(256, 1024 * 1025 / 2 / 4, 256, 0.25)
    t = [m.stage(s, piece).total for s in range(2)]
    assert pre.total == pytest.approx(sum(t) + 3 * max(t) + m.hop(0, 256) + m.hop(1, 0))
    assert pre.factor == pytest.approx((sum(t) + 3 * max(t)) / max(t))


def test_uneven_shards_take_the_slowest_rank():
    """9 heads at tp=2: the stage's time is rank 0's (6 heads)."""
    odd = replace(cfg(LLAMA3_8B), num_heads=36, num_kv_heads=12, head_dim=128)
    c = ideal(clusters.resolve("8xH100"))
    m = Model(odd, Layout(4, 1, 2), c, "bfloat16")
    shares = rank_shares(odd, Layout(4, 1, 2), "bfloat16")
    assert shares[0].q_heads == 18 and shares[1].q_heads == 18  # 12 KV groups split 6 + 6
    m3 = Model(odd, Layout(1, 1, 5), c, "bfloat16")
    assert m3.stage(0, Pass(1, 1, 1, 1)).compute >= m.stage(0, Pass(1, 1, 1, 1)).compute * 2 / 5


def test_cpu_host_bandwidth_is_capped_per_node():
    """Ranks on one CPU host share its memory bandwidth."""
    host = clusters.resolve("cpu-host")
    small = cfg({**LLAMA3_8B, "num_hidden_layers": 2})
    assert Model(small, Layout(1, 1, 1), host, "float32").rates.bandwidth == pytest.approx(14e9)
    assert Model(small, Layout(1, 1, 16), host, "float32").rates.bandwidth == pytest.approx(100e9 / 16)


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
