"""Calibrate this machine, then bench layouts of a small model against the cost model, end to end.

The comparison's accuracy is the benchmark's business (benchmarks/planner.py, docs/benchmarks.md); here
every term must be produced, finite and non-negative where it is a time.
"""

from __future__ import annotations

import json
import math

import pytest

from meshlm.cli import main
from meshlm.plan import cluster as clusters
from meshlm.plan.bench import KEYS, run_bench
from meshlm.plan.calibrate import calibrate
from meshlm.plan.host import beside, mean, reference, scale_of
from meshlm.plan.layout import Layout

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> clusters.Cluster:
    """A quick calibration of this host, saved and read back as `meshlm plan --calibrate` does."""
    c = calibrate(threads=1, quick=True, max_load=1.0)  # CI hosts are shared: save whatever the load
    path = clusters.save(c, tmp_path_factory.mktemp("profile") / "local.json")
    back = clusters.load_file(path)
    assert back.node.device.flops["float32"] > 1e9 and back.node.device.bandwidth > 1e8
    assert back.node.device.layer_overhead > 0 and 0 < back.node.device.attention_eff < 2
    if back.node.devices > 1:
        assert {ln.transport for ln in back.node.links} & {"shm", "gloo"}
        assert all(ln.latency > 0 and ln.bandwidth > 0 for ln in back.node.links)
        # in-engine terms: a wait point per transport (decode, prefill), the pipeline layer, the hop
        assert all(len(ln.waits) >= 2 and ln.waits[0][0] > 0 for ln in back.node.links)
        assert back.node.device.pipeline_layer_overhead >= 0 and back.node.link("gloo").hop > 0
    return back


@pytest.mark.parametrize("layout", ["tp=1", "tp=2", "pp=2"])
def test_bench_pairs_every_term(layout, profile, checkpoint):
    """A layout runs through LLM; each term has a prediction and a measurement."""
    res = run_bench(str(checkpoint("llama_gqa")), Layout.parse(layout), profile, prompt=48, new=6, runs=1)
    assert not res.skipped, res.skipped
    for phase in ("prefill", "decode"):
        for key in KEYS:
            assert math.isfinite(res.predicted[phase][key]) and res.predicted[phase][key] >= 0
            assert math.isfinite(res.measured[phase][key])
        assert res.measured[phase]["total"] > 0
        if layout == "tp=2":
            assert res.predicted[phase]["collectives"] > 0 and res.measured[phase]["collectives"] > 0
    if layout == "pp=2":
        assert res.predicted["decode"]["bubble"] > 0
    # the profile kept its calibration's host reading; the bench read the host at the start, before each
    # timed run (one per phase here) and at the end, and predicted each phase from the profile scaled by
    # the mean of the readings beside its runs against it
    ref = reference(profile)
    assert ref is not None and ref.bandwidth > 1e8 and ref.matmul > 1e9
    assert [h.at for h in res.host] == ["start", "prefill", "decode", "end"] and res.unscaled
    assert res.scales == {ph: scale_of(ref, mean(beside(res.host, ph))) for ph in ("prefill", "decode")}


def test_calibrate_and_bench_from_the_command_line(tmp_path, monkeypatch, checkpoint, capsys):
    """`meshlm plan --calibrate --quick` saves the profile; `meshlm bench` prints predicted and measured."""
    monkeypatch.setenv(clusters.PROFILE_ENV, str(tmp_path / "local.json"))
    assert main(["plan", "--calibrate", "--quick", "--max-load", "1"]) == 0
    assert "saved to" in capsys.readouterr().out and (tmp_path / "local.json").exists()
    assert main(["bench", "--layout", "tp=2", "--model", str(checkpoint("llama_gqa")), "--runs", "1",
                 "--prompt-tokens", "32", "--new-tokens", "4", "--json"]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert res["layout"] == "dp=1 pp=1 tp=2" and res["predicted"]["decode"]["total"] > 0
    assert len(res["host"]) == 4 and all(res["scale"][ph]["bandwidth"] > 0 and res["scale"][ph]["matmul"] > 0
                                         for ph in ("prefill", "decode"))
    assert main(["bench", "--layout", "tp=1", "--model", str(checkpoint("llama_gqa")), "--runs", "1",
                 "--prompt-tokens", "32", "--new-tokens", "4", "--json", "--no-rescale"]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert res["host"] == [] and res["scale"] == {}
    assert res["predicted"] == res["unscaled"]
    assert main(["plan", "--model", str(checkpoint("llama_gqa"))]) == 0
    assert "chosen:" in capsys.readouterr().out
