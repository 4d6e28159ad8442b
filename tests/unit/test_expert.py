"""Expert parallelism without ranks: placement as data, the expert-parallel layer against the one-device one
(bitwise, and with a capacity factor against a hand-made reference), MoE configs, the planner's ep terms
(redundant replicas, the expert budget and its misses) and a failed gloo op naming the lost member."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import _hf_config

from meshlm.config import ModelConfig
from meshlm.errors import ConfigError
from meshlm.models.mixtral import Experts, expert_ffn
from meshlm.parallel.comm import single_process_groups
from meshlm.parallel.expert import ExpertLoad, Placement, make_expert_parallel
from meshlm.plan import cluster as clusters
from meshlm.plan.cost import estimate
from meshlm.plan.layout import Layout, Workload, rank_shares
from meshlm.plan.search import layouts

H, INTER, E, K, N = 16, 24, 6, 2, 37


def test_contiguous_placement_and_tables():
    p = Placement.contiguous(8, 3)
    assert p.slots == ((0, 1, 2), (3, 4, 5), (6, 7)) and p.slots_per_rank == 3 and p.ranks == 3
    assert p.replicas(4) == [(1, 1)]
    rank, slot, copies = p.tables()
    assert rank[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2] and slot[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert copies.tolist() == [1] * 8
    with pytest.raises(ConfigError, match=r"ep=9 exceeds the model's 8 experts"):
        Placement.contiguous(8, 9)


def test_placement_refuses_lost_experts_and_doubled_replicas():
    replicated = Placement(4, ((0, 1, 3), (2, 3)))  # expert 3 on both ranks
    assert replicated.replicas(3) == [(0, 2), (1, 1)]
    assert replicated.tables()[2].tolist() == [1, 1, 1, 2]
    with pytest.raises(ConfigError, match=r"leaves experts \[2\] on no rank"):
        Placement(4, ((0, 1), (3,)))
    with pytest.raises(ConfigError, match=r"two replicas of one expert on rank 1"):
        Placement(4, ((0, 1), (2, 3, 3)))


def _layer(capacity: float | None = None):
    """A random Experts layer and its expert-parallel twin on a group of one (the same weights)."""
    g = torch.Generator().manual_seed(3)
    ref = Experts(E, H, INTER)
    for p in ref.parameters():
        p.data = torch.randn(p.shape, generator=g)
    ep = Experts(E, H, INTER)
    ep.load_state_dict(ref.state_dict())
    load = ExpertLoad()
    make_expert_parallel(ep, single_process_groups().tp, Placement.contiguous(E, 1), 0, load, capacity)
    x = torch.randn(N, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    ids[: N // 2, 0] = 1  # a hot expert, so a capacity bites
    w = torch.rand(N, K, generator=g)
    return ref, ep, load, x, ids, w


def test_expert_parallel_layer_equals_one_device_bitwise():
    ref, ep, load, x, ids, w = _layer()
    assert torch.equal(ep(x, ids, w), ref(x, ids, w))
    assert load.snapshot()["routed"][0] == torch.bincount(ids.flatten(), minlength=E).tolist()
    assert not load.snapshot()["dropped"]


def test_capacity_factor_keeps_the_first_tokens_of_each_expert():
    """Capacity ceil(f x N x K / E): each expert keeps its first tokens in token order, the rest add nothing."""
    factor = 0.8
    _, ep, load, x, ids, w = _layer(factor)
    cap = math.ceil(factor * N * K / E)
    want, dropped = torch.zeros_like(x), 0
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        dropped += max(0, len(tok) - cap)
        tok, slot = tok[:cap], slot[:cap]
        want.index_add_(0, tok, expert_ffn(x[tok], ep.w1[e], ep.w3[e], ep.w2[e]) * w[tok, slot, None])
    torch.testing.assert_close(ep(x, ids, w), want)
    assert dropped > 0 and load.snapshot()["dropped"] == {0: dropped}


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_moe_configs_count_transformers_parameters(kind):
    """ModelConfig.from_hf reads the MoE fields transformers builds from: the parameter counts agree."""
    from transformers import AutoModelForCausalLM

    hf_cfg = _hf_config(kind, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict() | {"architectures": [type(model).__name__]})
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.is_moe and cfg.norm_topk_prob == (kind == "mixtral") and cfg.qk_norm == (kind == "olmoe")
    assert cfg.dense_layers == ((1,) if kind == "qwen2_moe" else ())


def test_qwen2_moe_sparse_step_and_dense_layers():
    d = {**_hf_config("qwen2_moe", 6).to_dict(), "architectures": ["Qwen2MoeForCausalLM"],
         "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    cfg = ModelConfig.from_hf(d)
    assert [cfg.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]


MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768}


def test_planner_sizes_ranks_by_expert_share():
    """At ep = tp a rank stores its whole experts: 3 + 3 + 2 of 8 at ep=3, against an even third of each at tp=3;
    the expert weights over all ranks add up to the model's either way."""
    cfg = ModelConfig.from_hf(MIXTRAL_8X7B)
    expert = 3 * cfg.hidden_size * cfg.expert_inter
    for lay in (Layout(tp=3), Layout(ep=3)):
        shares = rank_shares(cfg, lay, "bfloat16")
        attn = [2 * cfg.hidden_size * cfg.head_dim * (s.q_heads + s.kv_heads) for s in shares]
        routed = [s.layer_params - a - cfg.hidden_size * (cfg.num_experts + 2) for s, a in zip(shares, attn)]
        assert sum(routed) == pytest.approx(cfg.num_experts * expert, rel=1e-4)
        if lay.ep > 1:
            assert routed == [3 * expert, 3 * expert, 2 * expert]
    assert Layout.parse("ep=2") == Layout(tp=2, ep=2)


def test_planner_prices_the_all_to_all_and_searches_ep():
    cfg = ModelConfig.from_hf(MIXTRAL_8X7B)
    h100 = clusters.resolve("8xH100")
    work = Workload(prompt_tokens=512, output_tokens=64, batch=8)
    tp, ep = (estimate(cfg, lay, h100, work, "bfloat16") for lay in (Layout(tp=2), Layout(ep=2)))
    assert ep.decode.collectives != tp.decode.collectives and ep.decode.collectives > 0
    assert any(lay.ep > 1 for lay in layouts(h100, moe=True))
    assert not any(lay.ep > 1 for lay in layouts(h100, moe=False))


TINY_MOE = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
            "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256}
ONE = 3 * 64 * 96 * 4  # one expert (w1, w3, w2) in float32: 73,728 bytes


def test_planner_counts_redundant_replicas_and_resident_experts():
    """Hand arithmetic on 4 experts x 2 layers: at ep=2 with 2 redundant copies a rank is sized for its
    balancer slots (2 + ceil(2 / 2) = 3 experts a layer, one more than without); with an expert budget of
    2.5 experts a tp=1 rank keeps 2 resident of its 8 (one pool over the layers), at least one under any
    budget, and every other expert's bytes leave its weights."""
    cfg = ModelConfig.from_hf(TINY_MOE)
    plain, extra = (rank_shares(cfg, Layout(ep=2, redundant=r), "float32") for r in (0, 2))
    assert [s.experts for s in plain] == [2 * 2, 2 * 2] and [s.experts for s in extra] == [2 * 3, 2 * 3]
    assert [b.weight_bytes - a.weight_bytes for a, b in zip(plain, extra)] == [2 * ONE, 2 * ONE]
    full = rank_shares(cfg, Layout(), "float32")[0]
    assert (full.experts, full.resident) == (8, 8)
    budget = rank_shares(cfg, Layout(expert_budget=int(2.5 * ONE)), "float32")[0]
    assert (budget.experts, budget.resident, budget.expert_bytes) == (8, 2, ONE)
    assert full.weight_bytes - budget.weight_bytes == (8 - 2) * ONE
    assert rank_shares(cfg, Layout(expert_budget=10), "float32")[0].resident == 1
    assert str(Layout(expert_budget=int(2.5 * ONE))) == "dp=1 pp=1 tp=1 expert-budget=0.2MB"
    with pytest.raises(ConfigError, match="--expert-budget .* needs --tp 1"):
        Layout(ep=2, expert_budget=ONE)
    with pytest.raises(ConfigError, match="--redundant-experts .* needs --ep > 1"):
        Layout(redundant=2)


def test_planner_prices_expert_buffer_misses():
    """Misses read at the node's host-read rate: decode of one token touches 2 experts in each of 2 layers;
    with 2 of 8 resident the assumed hit rate is 1/4, so 3 of 4 are read (1 GB/s: 3 x ONE / 1e9 s); a measured
    hit rate of 1/2 reads 2. A prefill of 8 tokens touches all 4 experts a layer: 6 of 8 read. Everything
    else equals the all-resident estimate."""
    from dataclasses import replace

    cfg = ModelConfig.from_hf(TINY_MOE)
    h100 = clusters.resolve("8xH100")
    cluster = replace(h100, node=replace(h100.node, host_read=1e9))
    work = Workload(prompt_tokens=8, output_tokens=8, batch=1)
    full = estimate(cfg, Layout(dp=8), cluster, work, "float32")
    buf = estimate(cfg, Layout(dp=8, expert_budget=2 * ONE), cluster, work, "float32")
    assert full.decode.fetch == 0 and buf.decode.fetch == pytest.approx(3 * ONE / 1e9)
    assert buf.prefill.fetch == pytest.approx(6 * ONE / 1e9)
    assert buf.decode.total - buf.decode.fetch == pytest.approx(full.decode.total)
    measured = estimate(cfg, Layout(dp=8, expert_budget=2 * ONE), cluster, replace(work, expert_hit_rate=0.5),
                        "float32")
    assert measured.decode.fetch == pytest.approx(2 * ONE / 1e9)
    gpu = estimate(cfg, Layout(dp=8, expert_budget=2 * ONE), h100, work, "float32")  # no host_read: PCIe
    assert gpu.decode.fetch == pytest.approx(3 * ONE / clusters.PCIE_BYTES_S)


def test_planner_plans_a_layout_that_fits_only_with_an_expert_budget():
    """Mixtral 8x7B in bf16 (~93 GB) on one 80 GiB H100: every expert resident does not fit; the largest budget
    that does (whole experts) is chosen, one expert more would not fit, and its misses are priced."""
    from dataclasses import replace

    from meshlm.plan.memory import budget_that_fits, check
    from meshlm.plan.search import search

    cfg = ModelConfig.from_hf(MIXTRAL_8X7B)
    h100 = clusters.resolve("8xH100")
    one = replace(h100, name="1xH100", node=replace(h100.node, devices=1))
    work = Workload(prompt_tokens=512, output_tokens=64, batch=4)
    assert not check(cfg, Layout(), one, work, "bfloat16").ok
    budget = budget_that_fits(cfg, Layout(), one, work, "bfloat16")
    expert = 3 * cfg.hidden_size * cfg.expert_inter * 2
    assert budget % expert == 0 and 0 < budget < 32 * 8 * expert
    assert check(cfg, Layout(expert_budget=budget), one, work, "bfloat16").ok
    assert not check(cfg, Layout(expert_budget=budget + expert), one, work, "bfloat16").ok
    plan = search(cfg, one, work, "bfloat16")
    assert plan.chosen is not None and plan.chosen.layout == Layout(expert_budget=budget)
    assert plan.chosen.estimate.decode.fetch > 0 and "expert-budget=" in str(plan.chosen.layout)
    assert budget_that_fits(cfg, Layout(ep=2), h100, work, "bfloat16") == 0  # a budget needs tp = 1


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_loader_reads_only_the_experts_a_rank_owns(kind, checkpoint):
    """Rank 1 of ep=2 asks the checkpoint for its experts' tensors and no other expert's."""
    from meshlm.checkpoint import open_checkpoint
    from meshlm.checkpoint.loader import build_meta, load_weights
    from meshlm.models.registry import sharding_plan
    from meshlm.parallel.comm import Comm
    from meshlm.parallel.styles import apply_plan

    ckpt = open_checkpoint(str(checkpoint(kind)))
    read: list[str] = []

    class Recording:
        def __getattr__(self, name):
            return getattr(ckpt.source, name)

        def read(self, name, part=None):
            read.append(name)
            return ckpt.source.read(name, part)

    cfg = ckpt.cfg
    model = build_meta(cfg)
    part_for = apply_plan(model, sharding_plan(cfg), cfg, Comm("tp", [0, 1], None, 1), ep=2)
    load_weights(model, cfg, Recording(), torch.float32, part_for=part_for)
    mine = set(Placement.contiguous(cfg.num_experts, 2).slots[1])
    experts = [n for n in read if ".experts." in n]
    assert experts and {int(n.split(".experts.")[1].split(".")[0]) for n in experts} == mine
    w1 = model.get_submodule(f"layers.{next(i for i in range(cfg.num_layers) if cfg.is_sparse(i))}.mlp.experts").w1
    assert w1.shape == (len(mine), cfg.expert_inter, cfg.hidden_size)


def test_failed_gloo_op_names_the_lost_member():
    """A failed gloo op (Comm.lost): a member on this host whose process is gone is named as exited; with none
    gone, the members on other hosts are named as the suspects, with the op's own error."""
    import subprocess
    import sys

    from meshlm.parallel.comm import Comm, Member
    from meshlm.parallel.shm import PeerLostError

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    members = [Member("h0", "ns", 1), Member("h0", "ns", 99), Member("h0", "ns", gone.pid), Member("h1", "ns", 7)]
    comm = Comm("tp", [4, 5, 6, 7], None, 5, members=members)
    err = comm.lost("all_to_all_v", RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:4711"))
    assert isinstance(err, PeerLostError)
    assert str(err) == f"rank 6 (pid {gone.pid}) exited while rank 5 waited for it in tp/all_to_all_v over gloo"
    members[2] = Member("h0", "ns", 1)  # everyone on this host alive: the far member is the suspect
    err = Comm("tp", [4, 5, 6, 7], None, 5, members=members).lost("all_gather", RuntimeError("Timed out\nmore"))
    assert str(err) == ("tp/all_gather over gloo failed on rank 5: Timed out; ranks on other hosts (one of them "
                        "failed or is unreachable): rank 7 on h1")
    raw = RuntimeError("Timed out")  # members unknown: the op's own error, for the caller to add what it knows
    assert Comm("tp", [4, 5], None, 5).lost("all_gather", raw) is raw
