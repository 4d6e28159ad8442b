"""Cluster descriptions (presets, JSON, YAML, the saved local profile), layouts and workloads."""

from __future__ import annotations

import json

import pytest

from meshlm.errors import ConfigError
from meshlm.plan import cluster as clusters
from meshlm.plan.layout import Layout, Workload


def flat(d: object, key: str = "") -> dict[str, object]:
    """Nested dicts and lists as {path: leaf}."""
    if isinstance(d, dict):
        return {k: v for kk, vv in d.items() for k, v in flat(vv, f"{key}.{kk}").items()}
    if isinstance(d, list):
        return {k: v for i, vv in enumerate(d) for k, v in flat(vv, f"{key}.{i}").items()}
    return {key: d}


def same(a: clusters.Cluster, b: clusters.Cluster) -> bool:
    """Equal descriptions, up to float round-off from unit conversions."""
    fa, fb = flat(clusters.to_dict(a)), flat(clusters.to_dict(b))
    return fa.keys() == fb.keys() and all(fa[k] == pytest.approx(fb[k]) for k in fa)


@pytest.mark.parametrize("name", sorted(clusters.PRESETS))
def test_presets_round_trip(name, tmp_path):
    """Every preset loads, and survives to_dict -> JSON -> from_dict unchanged."""
    c = clusters.resolve(name)
    assert c.devices >= 1 and c.node.link().bandwidth > 0
    path = clusters.save(c, tmp_path / f"{name}.json")
    assert same(clusters.load_file(path), c)


def test_yaml_and_the_local_profile(tmp_path, monkeypatch):
    """A YAML file loads; 'local' is the saved profile, or this host's defaults before calibration."""
    pytest.importorskip("yaml")
    c = clusters.resolve("2x8xH100")
    assert same(clusters.load_file(clusters.save(c, tmp_path / "c.yaml")), c)
    monkeypatch.setenv(clusters.PROFILE_ENV, str(tmp_path / "missing.json"))
    local = clusters.resolve("local")
    assert "uncalibrated" in local.name and local.node.shared_memory
    monkeypatch.setenv(clusters.PROFILE_ENV, str(clusters.save(c, tmp_path / "profile.json")))
    assert same(clusters.resolve(None), c)


def test_a_hand_written_yaml_with_bandwidth_per_dtype(tmp_path):
    """The file a user writes by hand (the format calibration writes): bandwidth per dtype, or one for all."""
    path = tmp_path / "mine.yaml"
    path.write_text("name: box\nnode:\n  devices: 4\n  shared_memory: true\n  device:\n    memory_gib: 64\n"
                    "    tflops: {float32: 0.05, bfloat16: 0.1}\n    bandwidth_gbs: {float32: 12, bfloat16: 8}\n"
                    "  links: [{transport: shm, bandwidth_gbs: 2, latency_us: 20}]\n")
    c = clusters.load_file(path)
    dev = c.node.device
    assert c.nodes == 1 and c.node.devices == 4 and c.node.link().latency == pytest.approx(20e-6)
    assert dev.stream("float32") == pytest.approx(12e9 * 0.8) and dev.stream("bfloat16") == pytest.approx(8e9 * 0.8)
    assert dev.stream("float16") == dev.stream("float32")  # not listed: the first one
    assert same(clusters.load_file(clusters.save(c, tmp_path / "again.yaml")), c)
    assert clusters.resolve("8xH100").node.device.stream("float16") == pytest.approx(3350e9 * 0.8)


def test_cpu_host_describes_both_transports():
    """shm and gloo links, chosen by the transport name comm_stats reports ('shm+gloo' when mixed)."""
    c = clusters.resolve("cpu-host")
    assert c.node.link("gloo").latency > c.node.link("shm").latency
    assert c.node.link("shm+gloo").transport == "shm"
    assert c.with_transport("gloo").node.link().transport == "gloo"
    with pytest.raises(ConfigError, match="no 'nccl' link"):
        c.node.link("nccl")


def test_bad_descriptions_name_the_problem(tmp_path):
    """A missing field, an unknown preset and a multi-node cluster without `inter` say what to fix."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "node": {"devices": 2}}))
    with pytest.raises(ConfigError, match="device"):
        clusters.load_file(bad)
    with pytest.raises(ConfigError, match="neither a preset"):
        clusters.resolve("no-such-cluster")
    d = dict(clusters.PRESETS["8xH100"], nodes=2)
    with pytest.raises(ConfigError, match="no `inter` link"):
        clusters.from_dict(d)


def test_missing_dtype_rate_names_the_fix():
    """A device without a rate for the dtype asks for one."""
    with pytest.raises(ConfigError, match="tflops.float16"):
        clusters.resolve("cpu-host").node.device.rate("float16")


def test_link_between_crosses_nodes():
    """Ranks 7 and 8 of 2 x 8 sit on different nodes."""
    c = clusters.resolve("2x8xH100")
    assert c.link_between([0, 7]).transport == "nvlink"
    assert c.link_between([7, 8]).transport == "infiniband"


def test_layout_and_workload_parsing(tmp_path):
    """'tp=2,pp=1' and inline or file workloads; bad input names the format."""
    assert Layout.parse("tp=2,pp=1") == Layout(1, 1, 2) and str(Layout(2, 2, 4)) == "dp=2 pp=2 tp=4"
    with pytest.raises(ConfigError, match="tp=2,pp=1"):
        Layout.parse("tp=two")
    w = Workload.parse("prompt=2048,output=256,batch=16,objective=ttft,slo_tpot_ms=50")
    got = (w.prompt_tokens, w.output_tokens, w.batch, w.objective, w.slo_tpot_s)
    assert got == (2048, 256, 16, "ttft", 0.05)
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"prompt_tokens": 100, "batch": 2}))
    assert Workload.parse(str(path)) == Workload(prompt_tokens=100, batch=2)
    with pytest.raises(ConfigError, match="unknown"):
        Workload.parse("prompts=5")
    with pytest.raises(ConfigError, match="objective"):
        Workload(objective="fast")
