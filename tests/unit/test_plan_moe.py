"""The planner's MoE call overhead: a fixed cost per sparse MoE layer plus one per expert run (ep > 1: its own
line, a rank's share of the experts), none for dense layers or dense models; calibration's fit of it."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
from test_plan_memory import LLAMA3_8B, cfg

from meshlm.calibrate import fit_moe_overhead, moe_overhead
from meshlm.config import ModelConfig
from meshlm.plan import cluster as clusters
from meshlm.plan.cost import estimate
from meshlm.plan.layout import Layout, Workload

SMALL_MOE = {"architectures": ["MixtralForCausalLM"], "hidden_size": 512, "intermediate_size": 768,
             "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8000,
             "num_local_experts": 16, "num_experts_per_tok": 2, "max_position_embeddings": 4096}
FIXED, PER, EP_FIXED, EP_PER = 20e-6, 40e-6, 200e-6, 50e-6


def with_moe(c: clusters.Cluster, scale: float = 1.0) -> clusters.Cluster:
    """c with MoE overheads FIXED, PER, EP_FIXED, EP_PER times scale."""
    dev = replace(c.node.device, moe_overhead=FIXED * scale, expert_overhead=PER * scale,
                  ep_moe_overhead=EP_FIXED * scale, ep_expert_overhead=EP_PER * scale)
    return replace(c, node=replace(c.node, device=dev))


def moe(top_k: int = 2, **kw) -> ModelConfig:
    """SMALL_MOE with top_k experts a token (and any ModelConfig field replaced)."""
    return replace(ModelConfig.from_hf({**SMALL_MOE, "num_experts_per_tok": top_k}), **kw)


def extra(model: ModelConfig, layout: Layout, work: Workload, c: clusters.Cluster) -> tuple[float, float]:
    """(decode, prefill) seconds the MoE overhead adds to the estimate."""
    on, off = (estimate(model, layout, x, work, "float32") for x in (with_moe(c), with_moe(c, 0.0)))
    return on.decode.total - off.decode.total, on.prefill.total - off.prefill.total


def test_term_per_moe_layer_and_per_expert_run():
    """Batch-1 decode runs K experts in each MoE layer (top-1 fewer than top-2); a 2-sequence batch 2K; a prefill
    of 16 tokens all 16; dense layers of an MoE model (Qwen2-MoE's mlp_only_layers) pay nothing; each stage
    of a pipeline pays for its own MoE layers (the trip adds them up)."""
    h100 = clusters.resolve("8xH100")
    one = Workload(prompt_tokens=16, output_tokens=8, batch=1)
    top1, top2 = (extra(moe(k), Layout(), one, h100) for k in (1, 2))
    assert top1[0] == pytest.approx(6 * (FIXED + PER)) and top2[0] == pytest.approx(6 * (FIXED + 2 * PER))
    assert top1[0] < top2[0]
    assert top2[1] == pytest.approx(6 * (FIXED + 16 * PER))  # 16 tokens x 2 touch all 16 experts
    two = extra(moe(2), Layout(), replace(one, batch=2), h100)
    assert two[0] == pytest.approx(6 * (FIXED + 4 * PER))
    dense_two = extra(moe(2, dense_layers=(0, 3)), Layout(), one, h100)
    assert dense_two[0] == pytest.approx(4 * (FIXED + 2 * PER))
    assert extra(moe(2), Layout(pp=2), one, h100)[0] == pytest.approx(6 * (FIXED + 2 * PER))


def test_tp_runs_every_touched_expert_and_ep_its_share():
    """tp=2 slices every expert: each rank runs all K (the ep = 1 line); ep=2 takes the ep line with half the
    touched experts per rank, at least one: batch 1 top-2 runs 1 a rank, a prefill of 16 tokens 8."""
    h100 = clusters.resolve("8xH100")
    one = Workload(prompt_tokens=16, output_tokens=8, batch=1)
    assert extra(moe(2), Layout(tp=2), one, h100)[0] == pytest.approx(6 * (FIXED + 2 * PER))
    dec, pre = extra(moe(2), Layout(ep=2), one, h100)
    assert dec == pytest.approx(6 * (EP_FIXED + EP_PER)) and pre == pytest.approx(6 * (EP_FIXED + 8 * EP_PER))
    assert extra(moe(1), Layout(ep=2), one, h100)[0] == pytest.approx(6 * (EP_FIXED + EP_PER))  # half: one
    assert extra(moe(2), Layout(ep=4), one, h100)[0] == pytest.approx(6 * (EP_FIXED + EP_PER))


def test_a_cpu_host_time_shares_the_term_like_the_rest_of_compute():
    """Two ranks of one rank's threads on a one-core host take twice as long, the MoE calls included."""
    host = clusters.uncalibrated_local(1)
    one = Workload(prompt_tokens=16, output_tokens=8, batch=1)
    assert extra(moe(2), Layout(), one, host)[0] == pytest.approx(6 * (FIXED + 2 * PER))
    assert extra(moe(2), Layout(tp=2), one, host)[0] == pytest.approx(2 * 6 * (FIXED + 2 * PER))


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2), Layout(pp=2), Layout(dp=2, tp=4), Layout(tp=2, cp=2)])
def test_dense_models_are_unchanged(layout):
    """A dense model's every term is the same with any MoE overhead, exactly (it has no MoE layer)."""
    for name in ("8xH100", "cpu-host"):
        c = clusters.resolve(name)
        work = Workload(prompt_tokens=512, output_tokens=64, batch=4)
        big, zero = (estimate(cfg(LLAMA3_8B), layout, with_moe(c, s), work, "bfloat16") for s in (1e3, 0.0))
        assert big.prefill == zero.prefill and big.decode == zero.decode and big.throughput == zero.throughput


def test_large_overhead_moves_the_ranking_the_expected_way():
    """A small MoE on H100s: with no call overhead tp=2 decodes a batch of 8 fastest (ep's bytes and all-to-alls
    cost a little more); with a large per-expert cost ep=2 wins (each rank runs half the 16 touched experts,
    tp ranks all 16), and at batch 1 (2 experts touched, ep's bookkeeping per layer) ep=2 falls furthest behind."""
    h100 = clusters.resolve("8xH100")
    layouts = [Layout(), Layout(tp=2), Layout(ep=2)]
    tpot = lambda c, batch: [estimate(moe(2), lay, c, Workload(prompt_tokens=16, output_tokens=64, batch=batch),
                                      "float32").decode.total for lay in layouts]
    batch8 = tpot(with_moe(h100, 0.0), 8)
    assert min(batch8) == batch8[1]
    batch8 = tpot(with_moe(h100, 10.0), 8)
    assert min(batch8) == batch8[2]
    zero, big = tpot(with_moe(h100, 0.0), 1), tpot(with_moe(h100, 10.0), 1)
    assert big[2] / big[1] > zero[2] / zero[1] and max(big) == big[2]


def test_cluster_files_carry_the_figures(tmp_path):
    """The four figures round-trip through the file (in us); a hand-written file without them prices none;
    the presets carry defaults (cpu-host: measured on the development host; GPUs: estimates)."""
    c = with_moe(clusters.resolve("cpu-host"))
    back = clusters.load_file(clusters.save(c, tmp_path / "c.yaml")).node.device
    assert (back.moe_overhead, back.expert_overhead, back.ep_moe_overhead, back.ep_expert_overhead) == \
        pytest.approx((FIXED, PER, EP_FIXED, EP_PER))
    d = clusters.to_dict(c)
    for k in ("moe_overhead_us", "expert_overhead_us", "ep_moe_overhead_us", "ep_expert_overhead_us"):
        del d["node"]["device"][k]
    bare = clusters.from_dict(d).node.device
    assert bare.moe_overhead == bare.expert_overhead == bare.ep_moe_overhead == bare.ep_expert_overhead == 0.0
    for name in ("cpu-host", "8xH100"):
        dev = clusters.resolve(name).node.device
        assert 0 < dev.moe_overhead < dev.ep_moe_overhead and 0 < dev.expert_overhead <= dev.ep_expert_overhead
    assert {f.name for f in fields(clusters.Device)} >= {"moe_overhead", "ep_expert_overhead"}


def test_fit_recovers_fixed_and_per_expert_costs():
    """Exact lines come back exactly; a deterministic +-3% wobble within a few percent; a negative intercept or
    slope clamps to zero; one expert count alone cannot separate the two and says so."""
    runs = [1, 2, 2, 4, 5, 8, 8, 1, 3, 7]
    assert fit_moe_overhead([(x, 30e-6 + 45e-6 * x) for x in runs]) == pytest.approx((30e-6, 45e-6))
    wobble = [(x, (30e-6 + 45e-6 * x) * (1 + 0.03 * math.sin(7 * i))) for i, x in enumerate(runs)]
    fixed, per = fit_moe_overhead(wobble)
    assert fixed == pytest.approx(30e-6, rel=0.3) and per == pytest.approx(45e-6, rel=0.05)
    assert fit_moe_overhead([(x, 45e-6 * x - 10e-6) for x in runs]) == pytest.approx((0.0, 45e-6))
    assert fit_moe_overhead([(x, 50e-6 - 1e-6 * x) for x in runs])[1] == 0.0
    with pytest.raises(ValueError, match="two different expert counts"):
        fit_moe_overhead([(2, 1e-4), (2, 1.1e-4)])


def test_calibration_times_the_real_moe_layer():
    """The calibration's timing of the real layers (both paths) runs quickly and finds a positive cost per
    expert run (8 experts run take longer than 1)."""
    for ep in (False, True):
        fixed, per = moe_overhead(0.002, 10e9, expert_parallel=ep)
        assert fixed >= 0 and per > 0 and math.isfinite(fixed + per)
