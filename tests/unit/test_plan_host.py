"""Live rescaling of a profile to the host's state (meshlm/plan/host.py): the scale from two readings, what
it changes in a profile, and what that does to the cost model's bandwidth- and compute-bound terms."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_plan_memory import LLAMA3_8B, cfg

from meshlm.plan import cluster as clusters
from meshlm.plan.bench import BenchResult, format_bench, predicted_terms, rescaled_terms
from meshlm.plan.calibrate import at_median
from meshlm.plan.cost import Model, Pass
from meshlm.plan.host import HostReading, Scale, beside, beside_run, mean, reference, rescale, scale_of
from meshlm.plan.layout import Layout

SMALL = {**LLAMA3_8B, "num_hidden_layers": 4, "vocab_size": 1024}
DECODE, PREFILL = Pass(1, 17, 17, 1), Pass(256, 256 * 257 / 2, 256, 1)


def profile(**notes) -> clusters.Cluster:
    """The cpu-host preset cut to 2 cores, no software overhead (the roofline alone), with `notes`."""
    c = clusters.resolve("cpu-host")
    dev = replace(c.node.device, layer_overhead=0.0, pipeline_layer_overhead=0.0, step_overhead=0.0)
    return replace(c, node=replace(c.node, devices=2, device=dev), notes=notes)


def compute(c: clusters.Cluster, work: Pass) -> float:
    """Seconds of the compute term of one tp=1 forward of `work`."""
    return Model(cfg(SMALL), Layout(), c, "float32").stage(0, work).compute


def test_scale_is_now_over_calibration_per_quantity():
    """(12 / 10 GB/s, 90 / 100 GFLOP/s) -> x1.2, x0.9; a quantity either side lacks, or no reference: x1."""
    ref = HostReading(10e9, 100e9)
    assert scale_of(ref, HostReading(12e9, 90e9)) == pytest.approx(Scale(1.2, 0.9))
    assert scale_of(ref, HostReading(12e9)) == Scale(1.2, 1.0)
    assert scale_of(HostReading(10e9), HostReading(12e9, 90e9)) == Scale(1.2, 1.0)
    assert scale_of(None, HostReading(12e9, 90e9)) == Scale()


def test_mean_of_readings_skips_quantities_not_read():
    """The mean of before and after, each quantity over the readings that have it."""
    got = mean([HostReading(10e9, 0.0), HostReading(14e9, 120e9)])
    assert got.bandwidth == pytest.approx(12e9) and got.matmul == pytest.approx(120e9)


def test_rescale_scales_bandwidths_and_matmul_rates_only():
    """Per-rank bandwidth and the node's cap x bandwidth, every dtype's rate x matmul; overheads, links and
    attention's fraction as calibrated; the scale is noted in the profile."""
    c = profile()
    c = replace(c, node=replace(c.node, device=replace(c.node.device, layer_overhead=300e-6)))
    got = rescale(c, Scale(0.8, 1.25))
    d0, d1 = c.node.device, got.node.device
    assert d1.bandwidth == pytest.approx(0.8 * d0.bandwidth)
    assert got.node.memory_bandwidth == pytest.approx(0.8 * c.node.memory_bandwidth)
    assert d1.flops == pytest.approx({k: 1.25 * v for k, v in d0.flops.items()})
    assert (d1.layer_overhead, d1.attention_eff, got.node.links) == (d0.layer_overhead, d0.attention_eff,
                                                                     c.node.links)
    assert got.notes["scale"] == {"bandwidth": 0.8, "matmul": 1.25}


def test_decode_follows_bandwidth_and_prefill_follows_the_matmul_rate():
    """A batch-1 decode step is bandwidth-bound (all but its attention scores, < 0.1% here): twice the
    bandwidth halves its compute term, twice the matmul rate leaves it; a 256-token prefill is
    compute-bound: twice the matmul rate takes most of it off (the activations' streaming stays), and both
    x2 halve it exactly."""
    c = profile()
    dec, pre = compute(c, DECODE), compute(c, PREFILL)
    assert compute(rescale(c, Scale(2.0, 1.0)), DECODE) == pytest.approx(dec / 2, rel=1e-3)
    assert compute(rescale(c, Scale(1.0, 2.0)), DECODE) == pytest.approx(dec, rel=1e-3)
    assert pre / 2 < compute(rescale(c, Scale(1.0, 2.0)), PREFILL) < 0.6 * pre
    assert compute(rescale(c, Scale(2.0, 2.0)), PREFILL) == pytest.approx(pre / 2)


def test_the_reference_reading_survives_the_profile_file(tmp_path):
    """notes["host_reading"] (human units) round-trips through save / load_file; a profile without it has
    no reference."""
    ref = HostReading(14.2e9, 121e9)
    c = profile(host_reading=ref.as_dict())
    back = clusters.load_file(clusters.save(c, tmp_path / "p.json"))
    assert reference(back) == pytest.approx(ref)
    assert reference(profile()) is None


def test_bench_text_shows_the_scale_beside_the_predictions():
    """format_bench names, per phase, the readings beside its runs, the calibration's and the scale used."""
    c = profile(host_reading=HostReading(10e9, 100e9).as_dict())
    host = [HostReading(11e9, 95e9, "prefill"), HostReading(13e9, 85e9, "decode"), HostReading(9e9, 80e9, "end")]
    res = BenchResult(Layout(), "m", host=host,
                      scales={"prefill": scale_of(reference(c), HostReading(12e9, 90e9)),
                              "decode": scale_of(reference(c), HostReading(11e9, 82.5e9))})
    res.predicted = res.measured = {ph: dict.fromkeys(("compute", "collectives", "p2p", "bubble", "total"), 0.01)
                                    for ph in ("prefill", "decode")}
    text = format_bench(res, c)
    assert "host beside the prefill runs 12.0 GB/s, 90 GFLOP/s against 10.0, 100 at calibration" in text
    assert "bandwidth x1.20, matmul x0.90" in text
    assert "host beside the decode runs 11.0 GB/s, 82 GFLOP/s" in text and "bandwidth x1.10, matmul x0.82" in text
    assert "not rescaled" in format_bench(replace(res, host=[]), c)


def test_each_phase_is_read_beside_its_own_runs():
    """A phase's readings: those labelled with it (taken right before its runs) and the next one after its
    last run; readings without labels (runs saved before they had them) all count for both phases."""
    r = [HostReading(b * 1e9, 0.0, at) for b, at in
         ((1, "start"), (2, "prefill"), (3, "prefill"), (4, "decode"), (5, "decode"), (6, "end"))]
    assert [x.bandwidth / 1e9 for x in beside(r, "prefill")] == [2, 3, 4]
    assert [x.bandwidth / 1e9 for x in beside(r, "decode")] == [4, 5, 6]
    old = [HostReading(1e9), HostReading(2e9)]
    assert beside(old, "decode") == old and beside([], "prefill") == []


def test_rescaled_terms_predicts_each_phase_from_its_readings():
    """Prefill from the profile scaled by the readings beside the prefill runs, decode by the decode runs'
    (each equal to predicting both phases from that one scale); no reference: as calibrated."""
    c = profile(host_reading=HostReading(10e9, 100e9).as_dict())
    host = [HostReading(10e9, 100e9, "start"), HostReading(5e9, 50e9, "prefill"), HostReading(20e9, 200e9, "decode"),
            HostReading(20e9, 200e9, "end")]
    args = (cfg(SMALL), Layout(), c, 256, 32, 1, "float32", "")
    terms, scales = rescaled_terms(*args, reference(c), host)
    assert scales["prefill"] == pytest.approx(Scale(1.25, 1.25)) and scales["decode"] == pytest.approx(Scale(2, 2))
    for ph in ("prefill", "decode"):
        assert terms[ph] == pytest.approx(predicted_terms(cfg(SMALL), Layout(), rescale(c, scales[ph]), 256, 32, 1,
                                                          "float32")[ph])
    assert terms["decode"]["compute"] < predicted_terms(*args)["decode"]["compute"] / 1.5
    plain, ones = rescaled_terms(*args, None, host)
    assert plain == predicted_terms(*args) and set(ones.values()) == {Scale()}


class _Readings:
    """Stands in for HostProbe: hands out the given readings in order."""

    def __init__(self, *readings: HostReading) -> None:
        self.left = list(readings)

    def read(self, at: str = "") -> HostReading:
        return self.left.pop(0)


def test_beside_run_reads_the_host_around_the_measurement():
    """fn() runs between two readings; the scale is their mean against the reference; no probe: x1."""
    ref = HostReading(14e9, 140e9)
    out, s = beside_run(_Readings(HostReading(10e9, 100e9), HostReading(11e9, 110e9)), ref, lambda: 42)
    assert out == 42 and s == pytest.approx(Scale(0.75, 0.75))
    assert beside_run(None, ref, lambda: 7) == (7, Scale())


def test_rates_are_taken_at_the_median_state_of_the_host():
    """Each measurement over the reading beside it, median, x the median reading: one reading caught in a
    dip (or one measurement) moves neither the reference nor the rate; a host slow all along gives the
    slow rate at a slow reference."""
    rate, ref = at_median([140, 139, 141, 100, 140], [140, 140, 75, 100, 140], [140, 140, 75, 100, 140, 139])
    assert ref == pytest.approx(139.5) and rate == pytest.approx(139.5)
    rate, ref = at_median([100, 101, 99], [104, 104, 103], [104, 104, 103, 104])
    assert ref == 104 and rate == pytest.approx(100 / 104 * 104)
