"""Calibration writes the cluster file a user could write by hand; `meshlm bench` runs layouts on the engine."""

from __future__ import annotations

import json

import pytest

from meshlm.calibrate import calibrate
from meshlm.cli import main
from meshlm.parallel import shm
from meshlm.plan import cluster as clusters

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """A quick calibration of this host, saved as YAML."""
    path = tmp_path_factory.mktemp("profile") / "local.yaml"
    c = calibrate(quick=True)
    return c, clusters.save(c, path)


def test_calibration_writes_a_cluster_file_the_loader_reads(profile):
    """The saved YAML reads back into the same cluster; rates, bandwidths and both transports are measured."""
    c, path = profile
    back = clusters.load_file(path)
    assert clusters.to_dict(back) == clusters.to_dict(clusters.load_file(clusters.save(back, path)))
    dev = back.node.device
    assert back.node.devices == clusters.host_cores() and back.node.shared_memory
    assert set(dev.flops) == set(dev.bandwidth) == {"float32", "bfloat16"}
    assert all(v > 1e8 for v in (*dev.flops.values(), *dev.bandwidth.values()))
    assert 0 < dev.layer_overhead < 0.1 and 0 < dev.attention_eff
    assert 0 < dev.expert_overhead < 0.01 and 0 < dev.ep_expert_overhead < 0.01  # the MoE layers' calls
    assert 0 <= dev.moe_overhead < 0.01 and 0 <= dev.ep_moe_overhead < 0.01
    want = {"gloo", "shm"} if shm.supported() else {"gloo"}
    assert {ln.transport for ln in back.node.links} == want
    assert all(ln.bandwidth > 0 and ln.latency > 0 for ln in back.node.links)
    assert path.read_text().startswith("name: local")  # YAML, as a user writes it


def test_bench_runs_the_engine_and_pairs_the_prediction(profile, checkpoint, capsys):
    """tp=1 and pp=2 through meshlm.LLM: every layout measured and predicted, the pp one included."""
    _, path = profile
    model = str(checkpoint("llama_gqa"))
    argv = ["bench", "--model", model, "--cluster", str(path), "--layout", "tp=1", "--layout", "pp=2",
            "--prompt-tokens", "12", "--new-tokens", "4", "--batch", "2", "--runs", "1", "--threads", "1"]
    assert main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in results] == ["tp=1", "pp=2"] and not any(r["skipped"] for r in results)
    for r in results:
        for side in ("predicted", "measured"):
            assert r[side]["ttft"] > 0 and r[side]["tpot"] > 0
            assert r[side]["tok_s"] == pytest.approx(2 / r[side]["tpot"])
