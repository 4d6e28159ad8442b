"""Planner search: TP inside a node, PP across nodes; the smallest degree that fits; clear rejections."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_plan_memory import LLAMA3_8B, LLAMA3_70B, LLAMA3_405B, SERVING, cfg

from meshlm.config import ModelConfig
from meshlm.plan import cluster as clusters
from meshlm.plan.layout import Layout, Workload
from meshlm.plan.report import format_plan, plan_json
from meshlm.plan.search import layouts, search


def three_gpus() -> clusters.Cluster:
    """One node of three 80 GB GPUs (so tp=3 is a candidate)."""
    d = dict(clusters.PRESETS["8xH100"])
    d["node"] = {**d["node"], "devices": 3}
    return clusters.from_dict(d)


def test_layouts_use_every_device():
    """dp x pp x tp equals the device count for every candidate."""
    c = clusters.resolve("2x8xH100")
    assert all(lay.world == 16 for lay in layouts(c))
    assert Layout(1, 2, 8) in layouts(c) and Layout(16, 1, 1) in layouts(c)


def test_two_node_preset_puts_tp_inside_a_node_and_pp_across():
    """Llama-3.1-405B on 2 x 8 H100: pp=2 x tp=8; tp=16 rejected for its link; memory binds."""
    c = clusters.resolve("2x8xH100")
    plan = search(cfg(LLAMA3_405B), c, SERVING, "bfloat16")
    assert plan.chosen is not None and plan.chosen.layout == Layout(1, 2, 8)
    why = {r.layout: r for r in plan.rejected}
    assert why[Layout(1, 1, 16)].rejected == "link" and "infiniband" in why[Layout(1, 1, 16)].reason
    assert "put pp across nodes" in why[Layout(1, 1, 16)].reason
    assert why[Layout(2, 1, 8)].rejected == "memory"
    assert plan.binding.startswith("memory")
    text = format_plan(plan, cfg(LLAMA3_405B), c)
    assert "chosen: dp=1 pp=2 tp=8 (tp over nvlink, pp hops over infiniband)" in text
    for term in ("compute", "tp collectives", "pipeline transfers", "pipeline bubble",
                 "TPOT = slowest stage"):
        assert term in text


def test_405b_on_one_node_fails_with_the_fix():
    """No layout of one 8-GPU node fits 811 GB: the plan says two nodes (or a smaller dtype)."""
    plan = search(cfg(LLAMA3_405B), clusters.resolve("8xH100"), SERVING, "bfloat16")
    assert plan.chosen is None and not plan.ranked
    assert "nodes of 8: 2" in plan.fix and "smaller dtype" in plan.fix and "811.7 GB" in plan.fix


def test_model_that_fits_one_device_gets_the_smallest_degree():
    """Llama-3-8B on 8 H100 for throughput per device: tp=1, pp=1, eight replicas."""
    plan = search(cfg(LLAMA3_8B), clusters.resolve("8xH100"), SERVING, "bfloat16")
    assert plan.chosen is not None and plan.chosen.layout == Layout(8, 1, 1)
    assert "memory bandwidth" in plan.binding  # decode streams the weights


def test_latency_objective_spreads_wider():
    """For TPOT the same model goes to more tensor-parallel ranks than for throughput."""
    plan = search(cfg(LLAMA3_8B), clusters.resolve("8xH100"), replace(SERVING, objective="tpot"), "bfloat16")
    assert plan.chosen is not None and plan.chosen.layout.tp > 1


def test_slo_rejects_slow_layouts():
    """A TPOT target no layout of 70B meets on two nodes of 8 H100 except the widest leaves slo reasons."""
    work = replace(SERVING, slo_tpot_s=0.02)
    plan = search(cfg(LLAMA3_70B), clusters.resolve("2x8xH100"), work, "bfloat16")
    slo = [r for r in plan.rejected if r.rejected == "slo"]
    assert slo and all("over the 20.0 ms target" in r.reason for r in slo)
    assert plan.chosen is not None and plan.chosen.estimate.decode.total <= 0.02


def test_heads_rejection_only_when_tp_exceeds_the_heads():
    """9 heads: tp=3 is fine (whole KV groups); 4 heads on 8 devices: tp=8 rejected, naming tp <= 4."""
    odd = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 144,
                               "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 9,
                               "num_key_value_heads": 3, "head_dim": 16, "vocab_size": 512})
    plan = search(odd, three_gpus(), Workload(), "bfloat16")
    assert Layout(1, 1, 3) in [c.layout for c in plan.ranked]
    four = replace(odd, num_heads=4, num_kv_heads=2)
    plan = search(four, clusters.resolve("8xH100"), Workload(), "bfloat16")
    tp8 = next(r for r in plan.rejected if r.layout == Layout(1, 1, 8))
    assert tp8.rejected == "heads" and "tp <= 4" in tp8.reason


def test_json_output_is_plain_data():
    """--json: layouts, memory and every term as numbers."""
    import json

    plan = search(cfg(LLAMA3_70B), clusters.resolve("8xH100"), SERVING, "bfloat16")
    data = json.loads(json.dumps(plan_json(plan)))
    assert data["chosen"]["layout"] == {"dp": 2, "pp": 1, "tp": 4}  # tp=2 holds only 8 of the 16 sequences
    terms = data["chosen"]["estimate"]["decode"]
    assert set(terms) >= {"compute", "collectives", "control", "p2p", "bubble", "total"}
    assert terms["total"] == pytest.approx(sum(terms[k] for k in ("compute", "collectives", "control", "p2p",
                                                                  "bubble")))
    assert all(r["reason"] for r in data["rejected"])
