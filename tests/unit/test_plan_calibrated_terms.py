"""The calibrated terms of the cost model against hand calculations: pipeline per-layer overhead, the
ping-pong hop, cores shared by more ranks than the host has; the profile format; calibration under load."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_plan_memory import LLAMA3_8B, cfg

from meshlm.errors import ConfigError
from meshlm.plan import cluster as clusters
from meshlm.plan.cost import Model, Pass, forward_seconds
from meshlm.plan.fit import wait_line
from meshlm.plan.layout import Layout, Workload
from meshlm.plan.load import check_load, other_load, settle
from meshlm.plan.probe import Sample, decode_sample, slow_point, wait_point

SMALL = {**LLAMA3_8B, "num_hidden_layers": 4, "vocab_size": 1024}


def two_cores(**device) -> clusters.Cluster:
    """The cpu-host preset cut to 2 cores (one rank each), with `device` fields replaced."""
    c = clusters.resolve("cpu-host")
    return replace(c, node=replace(c.node, devices=2, device=replace(c.node.device, **device)))


def test_pipeline_stages_pay_the_pipeline_layer_overhead():
    """pp > 1: each layer of a stage costs pipeline_layer_overhead; pp = 1 keeps layer_overhead."""
    host = two_cores(layer_overhead=300e-6, pipeline_layer_overhead=500e-6, step_overhead=0.0)
    bare = two_cores(layer_overhead=0.0, pipeline_layer_overhead=0.0, step_overhead=0.0)
    model, one = cfg(SMALL), Pass(1, 17, 17, 1)
    pp2 = Model(model, Layout(pp=2), host, "float32").stage(0, one).compute
    assert pp2 == pytest.approx(Model(model, Layout(pp=2), bare, "float32").stage(0, one).compute + 2 * 500e-6)
    pp1 = Model(model, Layout(), host, "float32").stage(0, one).compute
    assert pp1 == pytest.approx(Model(model, Layout(), bare, "float32").stage(0, one).compute + 4 * 300e-6)


def test_a_hop_costs_the_ping_pong_once():
    """With a measured hop: hop + bytes / beta (not two alphas); without one: two alphas + bytes / beta."""
    host = two_cores()
    gloo = host.node.link("gloo")
    timed = replace(host, node=replace(host.node, links=(host.node.link("shm"), replace(gloo, hop=150e-6))))
    row = 4096 * 4
    assert Model(cfg(SMALL), Layout(pp=2), timed, "float32").hop(0, 1) == pytest.approx(
        150e-6 + row / gloo.bandwidth)
    assert Model(cfg(SMALL), Layout(pp=2), host, "float32").hop(0, 1) == pytest.approx(
        2 * gloo.latency + row / gloo.bandwidth)


def test_more_ranks_than_cores_share_them():
    """tp=4 on 2 cores: every rank gets half a core, compute and collectives take twice as long. pp=2 x tp=2
    decoding one sequence: one stage (2 ranks) computes at a time, no slowdown. Its prefill in 2 pieces:
    the middle slot has both stages (4 ranks) busy, so it takes twice as long: + 1 x the stage time."""
    host, model = two_cores(step_overhead=0.0), cfg(SMALL)
    one = Pass(1, 17, 17, 1)
    tp4 = Model(model, Layout(tp=4), host, "float32")
    assert tp4.slowdown(1) == 2.0
    slow, plain = tp4.stage(0, one, tp4.slowdown(1)), tp4.stage(0, one)
    assert slow.compute == pytest.approx(2 * plain.compute) and slow.collectives == pytest.approx(
        2 * plain.collectives)
    m = Model(model, Layout(pp=2, tp=2), host, "float32")
    assert m.slowdown(1) == 1.0 and m.slowdown(2) == 2.0
    dec = m.decode(Workload(prompt_tokens=16, output_tokens=2, batch=1))
    assert dec.compute == pytest.approx(max(m.stage(s, one).compute for s in range(2)))
    w = Workload(prompt_tokens=256, output_tokens=1, batch=1, prefill_chunks=2)
    piece = Pass(128, 256 * 257 / 2 / 2, 128, 0.5)
    t = [m.stage(s, piece) for s in range(2)]
    crit = max(t, key=lambda x: x.total)
    pre = m.prefill(w)
    assert pre.total == pytest.approx(sum(x.total for x in t) + crit.total + m.hop(0, 128) + m.hop(1, 0)
                                      + crit.total)  # slots: 1, 2, 1 stages busy; the middle one twice as long
    dedicated = Model(model, Layout(pp=2, tp=2), replace(host, node=replace(host.node, devices=4)), "float32")
    assert pre.total == pytest.approx(dedicated.prefill(w).total + crit.total)
    assert pre.compute == pytest.approx(3 * crit.compute) and pre.collectives == pytest.approx(3 * crit.collectives)


def test_a_transport_that_slows_compute_adds_to_each_segment():
    """Link.slows = s0 + k x segment per collective call: tp=2 compute grows by calls x that, each call's
    wait is read at the longer segment; tp=1 (no collectives) is untouched."""
    host = two_cores(step_overhead=0.0)
    gloo = replace(host.node.link("gloo"), waits=((1e-3, 100e-6), (3e-3, 300e-6)))  # w = 0.1 x segment
    slowed = replace(gloo, slows=((1e-3, 300e-6), (3e-3, 700e-6)))  # 100 us + 0.2 x segment
    plain_c = replace(host, node=replace(host.node, links=(gloo,)))
    slow_c = replace(host, node=replace(host.node, links=(slowed,)))
    model, one = cfg(SMALL), Pass(1, 17, 17, 1)
    plain = Model(model, Layout(tp=2), plain_c, "float32").stage(0, one)
    slow = Model(model, Layout(tp=2), slow_c, "float32").stage(0, one)
    calls = 2 * 4 + 2
    seg = plain.compute / calls
    assert slow.compute == pytest.approx(calls * (seg + 100e-6 + 0.2 * seg))
    extra = slow.compute / calls - seg
    assert slow.collectives - plain.collectives == pytest.approx(calls * 0.1 * extra)
    for c in (plain_c, slow_c):
        assert Model(model, Layout(), c, "float32").stage(0, one).compute == pytest.approx(
            Model(model, Layout(), host, "float32").stage(0, one).compute)


def test_profile_round_trip_and_older_skew_fields():
    """waits and hop survive save/load; an older profile's skew becomes two wait points."""
    host = two_cores(pipeline_layer_overhead=420e-6)
    gloo = replace(host.node.link("gloo"), waits=((5e-4, 1e-4), (2e-3, 4e-4)), hop=120e-6,
                   slows=((4e-4, 2e-4), (3e-3, 9e-4)))
    c = replace(host, node=replace(host.node, links=(gloo,)))
    back = clusters.from_dict(json.loads(json.dumps(clusters.to_dict(c))))
    flat = lambda pts: [x for pt in pts for x in pt]
    assert flat(back.node.link().waits) == pytest.approx(flat(gloo.waits))
    assert back.node.link().hop == pytest.approx(120e-6)
    assert flat(back.node.link().slows) == pytest.approx(flat(gloo.slows))
    assert back.node.device.pipeline_layer_overhead == pytest.approx(420e-6)
    old = clusters.to_dict(host)
    old["node"]["links"][0].update(skew_us=300, skew_from_us=500, skew_to_us=13000)
    ln = clusters.from_dict(old).node.links[0]
    assert flat(ln.waits) == pytest.approx([500e-6, 0.0, 13e-3, 300e-6])
    # the line through both points: c = 300 us / 12.5 ms = 0.024, w0 = 0 - 0.024 x 500 us < 0 -> 0
    assert ln.wait(1e-4) == pytest.approx(0.024 * 1e-4)


def test_wait_line_on_clean_points_is_the_line():
    """Points on w = 50 us + 0.05 x s give back w0 = 50 us, c = 0.05; none: no wait; one: that wait."""
    pts = ((1e-3, 100e-6), (2e-3, 150e-6), (4e-3, 250e-6))
    assert wait_line(pts) == pytest.approx((50e-6, 0.05))
    assert wait_line(()) == (0.0, 0.0) and wait_line(((1e-3, 80e-6),)) == (80e-6, 0.0)


def test_wait_line_on_noisy_non_monotonic_points():
    """The shm points of a real calibration, 96, 733, 534 us after 388, 2287, 8470 us of compute. Pair
    slopes 637/1899 = 0.335, 438/8082 = 0.0542, -199/6183 = -0.0322: median 438/8082. Residuals
    w - c s: 74.97, 609.1, 74.97 us: median 74.97 us. After a 1.36 ms segment (llama-400m tp=2 decode)
    that is 74.97 + 73.7 = 148.7 us per call, where the piecewise-linear reading gave 422 us."""
    pts = ((388e-6, 96e-6), (2287e-6, 733e-6), (8470e-6, 534e-6))
    c = 438 / 8082
    w0, slope = wait_line(pts)
    assert slope == pytest.approx(c) and w0 == pytest.approx(96e-6 - c * 388e-6)
    link = clusters.Link("shm", bandwidth=2.5e9, latency=26e-6, waits=pts)
    assert link.wait(1.36e-3) == pytest.approx(74.97e-6 + c * 1.36e-3, rel=1e-3)
    assert link.wait(1.36e-3) < 150e-6


def test_wait_line_ignores_one_outlier_and_clamps_at_zero():
    """Four points on w = 20 us + 0.1 x s and one 2 ms outlier: the line exactly (6 of 10 pair slopes are
    0.1, the outlier's 4 lie above; 4 of 5 residuals are 20 us). Falling waits: c = 0, w0 = their median."""
    line = [(s, 20e-6 + 0.1 * s) for s in (1e-3, 2e-3, 3e-3, 5e-3)]
    assert wait_line(tuple(sorted(line + [(4e-3, 2e-3)]))) == pytest.approx((20e-6, 0.1))
    assert wait_line(((1e-3, 300e-6), (2e-3, 200e-6), (3e-3, 100e-6))) == pytest.approx((200e-6, 0.0))


def test_wait_point_of_an_engine_sample():
    """Per call: seconds / calls less the alpha-beta time of its bytes; segment: compute between calls."""
    link = clusters.Link("shm", bandwidth=4e9, latency=20e-6)
    s = Sample(wall=0.030, ar_s=0.0049, ar_calls=49, ar_bytes=49 * 4096, tp_s=0.0052, tp_calls=50)
    seg, wait = wait_point(s, link, step_overhead=0.0008)
    assert seg == pytest.approx((0.030 - 0.0052 - 0.0008) / 50)
    assert wait == pytest.approx(100e-6 - (2 * 20e-6 + 4096 / 4e9))


def test_slow_point_is_the_measured_segment_beyond_the_roofline():
    """A tp=2 sample whose compute per call is the cost model's roofline + 50 us gives (roofline, 50 us);
    the model's tp=2 calls: two per layer, the embedding's and the logits' gather."""
    host = two_cores(step_overhead=0.8e-3)
    model, work = cfg(SMALL), Pass(1, 17, 17, 1)
    m = Model(model, Layout(tp=2), host, "float32")
    roof = max(forward_seconds(model, r, work, m.rates)[0] for r in m.shares) / (2 * 4 + 2)
    s = Sample(wall=0.0052 + 0.8e-3 + 10 * (roof + 50e-6), ar_s=0.005, ar_calls=9, ar_bytes=9 * 4096,
               tp_s=0.0052, tp_calls=10)
    assert slow_point(s, model, host, work) == pytest.approx((roof, 50e-6))


def test_a_decode_sample_noise_swamped_is_taken_again():
    """A probe decode sample with no compute left (wall <= collectives + step overhead) is measured again."""
    bad = Sample(wall=0.004, ar_s=0.004, ar_calls=9, ar_bytes=0, tp_s=0.0045, tp_calls=10)
    good = Sample(wall=0.010, ar_s=0.004, ar_calls=9, ar_bytes=0, tp_s=0.0045, tp_calls=10)

    class Eng:
        calls = 0

        def decode(self, new, runs):
            self.calls += 1
            return bad if self.calls == 1 else good

    eng = Eng()
    assert decode_sample(eng, 16, 3, step_overhead=0.5e-3) is good and eng.calls == 2


def test_settle_repeats_until_two_rounds_agree():
    """Rounds 100, 80, 78: 80 and 78 agree within 5%, the better (80) is kept; never agreeing raises."""
    xs = iter([100.0, 80.0, 78.0])
    assert settle(lambda: next(xs), "a rate") == 80.0
    times = iter([1.0, 2.0, 1.0, 2.0])
    assert settle(lambda: next(times), "a time", higher=False, rounds=4, tol=0.6) == 1.0
    flip = iter([1.0, 2.0] * 3)
    with pytest.raises(ConfigError, match="did not settle in 6 rounds.*--tolerance"):
        settle(lambda: next(flip), "the matmul rate")


def test_calibration_under_load_is_refused_with_the_fix():
    """Over the limit: an error naming the load and the fix; other_load reads a share in [0, 1]."""
    check_load(0.1, 0.2)
    with pytest.raises(ConfigError, match=r"used 45% of the CPUs.*when the machine is quiet.*--max-load 0.50"):
        check_load(0.45, 0.2)
    with other_load() as load:
        sum(range(10000))
    assert 0.0 <= load[0] <= 1.0
