"""Context parallelism without ranks: the 2N-chunk layout, the storage mapping, the LSE merge, the ring rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlm.parallel.context import (
    LinkFigures,
    choose_ring,
    chunk_bounds,
    kv_owner,
    kv_slot,
    merge_partials,
    owned_slots,
    partial_attention,
    plan_attention,
    shard_offsets,
    visible_mask,
)


@given(n=st.integers(0, 200), cp=st.integers(1, 8))
def test_shards_cover_once_balanced_and_rank0_holds_the_last(n, cp):
    """Every offset on exactly one rank, loads within one token of each other, the last token on rank 0."""
    bounds = chunk_bounds(n, cp)
    assert len(bounds) == 2 * cp and bounds[0][0] == 0 and bounds[-1][1] == n
    shards = [shard_offsets(n, cp, r) for r in range(cp)]
    assert sorted(x for s in shards for x in s) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if n:
        assert n - 1 in shards[0]
    if n >= 2 * cp:  # rank i's chunks are i and 2N-1-i
        assert shards[0][0] == 0 and shards[cp - 1][0] == bounds[cp - 1][0]


def test_shard_short_prompt():
    """A prompt shorter than 2N chunks: empty chunks come first, the tokens sit in the last chunks."""
    assert chunk_bounds(3, 2) == [(0, 0), (0, 1), (1, 2), (2, 3)]
    assert [shard_offsets(3, 2, r) for r in range(2)] == [[2], [0, 1]]
    assert [shard_offsets(10, 2, r) for r in range(2)] == [[0, 1, 7, 8, 9], [2, 3, 4, 5, 6]]


@given(cp=st.integers(1, 4), bs=st.integers(1, 5), n=st.integers(1, 80))
def test_storage_mapping_is_a_bijection_per_rank(cp, bs, n):
    """Round-robin by token: each rank's positions fill its blocks' slots once, in order."""
    nblocks = -(-n // (bs * cp))
    table = list(range(10, 10 + nblocks))[::-1]
    for r in range(cp):
        pos, slots = owned_slots(table, n, bs, cp, r)
        assert pos.tolist() == [p for p in range(n) if kv_owner(p, cp) == r]
        assert slots.tolist() == [kv_slot(p, table, bs, cp) for p in pos.tolist()]
        assert len(set(slots.tolist())) == len(slots)
        assert all(s // bs in table for s in slots.tolist())


def reference(q, k, v, visible, scale):
    """Single-device attention (SDPA, GQA) over the visible keys; 0 for a query that sees none."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                         vv.transpose(0, 1)[None], attn_mask=visible, scale=scale)[0]
    out = out.transpose(0, 1)
    return torch.where(visible.any(-1)[:, None, None], out, 0.0)


@settings(max_examples=60, deadline=None)
@given(tq=st.integers(1, 12), m=st.integers(1, 24), hkv=st.integers(1, 3), g=st.integers(1, 3),
       parts=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), density=st.floats(0.0, 1.0),
       fused=st.booleans())
def test_merge_matches_single_device(tq, m, hkv, g, parts, seed, density, fused):
    """Keys split at random into disjoint blocks; partials merged by LSE equal attention over all keys,
    including queries that see no key in some blocks (or none at all); fused kernel and dense path alike."""
    gen = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(tq, hkv * g, d, generator=gen)
    k, v = torch.randn(m, hkv, d, generator=gen), torch.randn(m, hkv, d, generator=gen)
    visible = torch.rand(tq, m, generator=gen) < density
    owner = torch.randint(0, parts, (m,), generator=gen)
    scale = 1 / math.sqrt(d)
    outs, lses = [], []
    for j in range(parts):
        sel = (owner == j).nonzero().flatten()
        plan = plan_attention(visible[:, sel], tile=3, min_full=2)  # small tiles and segments: all kinds occur
        o, lse = partial_attention(q, k[sel], v[sel], plan, scale, fused=fused)
        assert torch.isfinite(o).all()
        outs.append(o)
        lses.append(lse)
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out, reference(q, k, v, visible, scale), atol=1e-5, rtol=1e-5)
    none = ~visible.any(-1)
    assert torch.isinf(lse[none]).all() and torch.isfinite(lse[~none]).all()


@pytest.mark.parametrize("fused", [True, False])
def test_plan_of_the_chunk_layout_skips_invisible_pairs(fused):
    """Rank 0 of cp=2 (chunks 0 and 3) against both ring blocks: the plan skips the invisible chunk pairs, needs
    no mask for full or diagonal ones, and the merged partials equal single-device attention."""
    n, cp, d, hkv, g = 64, 2, 8, 2, 3
    gen = torch.Generator().manual_seed(0)
    qpos = torch.tensor(shard_offsets(n, cp, 0))
    blocks = [torch.tensor(shard_offsets(n, cp, j)) for j in range(cp)]
    q = torch.randn(len(qpos), hkv * g, d, generator=gen)
    kv = torch.randn(2, n, hkv, d, generator=gen)
    zeros = torch.zeros(n, dtype=torch.long)
    outs, lses, area = [], [], 0
    for kpos in blocks:
        visible = visible_mask(qpos, zeros[: len(qpos)], kpos, zeros[: len(kpos)])
        plan = plan_attention(visible, tile=8, min_full=4)
        assert all(s.mask is None for s in plan.segments)  # only full and diagonal segments in this layout
        area += sum((s.b - s.a) * (s.hi - s.lo) for s in plan.segments)
        o, lse = partial_attention(q, kv[0, kpos], kv[1, kpos], plan, 0.3, fused=fused)
        outs.append(o)
        lses.append(lse)
    assert area < 0.75 * len(qpos) * n  # the invisible quarter and the upper diagonal triangles are skipped
    out, _ = merge_partials(torch.stack(outs), torch.stack(lses))
    full = visible_mask(qpos, zeros[: len(qpos)], torch.arange(n), zeros)
    torch.testing.assert_close(out, reference(q, kv[0], kv[1], full, 0.3), atol=1e-5, rtol=1e-5)


def test_visible_mask_sequences_and_window():
    """Keys of another sequence are never visible; causal by global position; the window cuts old keys."""
    qp, qs = torch.tensor([3, 5]), torch.tensor([0, 1])
    kp, ks = torch.tensor([0, 3, 4, 5]), torch.tensor([0, 0, 1, 1])
    assert visible_mask(qp, qs, kp, ks).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert visible_mask(qp, qs, kp, ks, window=2).tolist() == [[False, True, False, False], [False, False, True, True]]


def test_ring_rule():
    """Algorithm 1: KV message no larger than Q's -> pass-KV; a large cached prefix -> pass-Q unless the
    transfer hides under compute (fast link, long T)."""
    # SmolLM2-135M: NH 9, NKV 3 -> threshold 2 * 3 / 9 = 2/3 of the context new.
    args = dict(cp=2, q_heads=9, kv_heads=3, head_dim=64, elem_bytes=4)
    assert choose_ring(1000, 0, link=None, **args) == "pass-kv"
    assert choose_ring(1000, 400, link=None, **args) == "pass-kv"  # 1000 / 1400 = 0.71 >= 0.67
    assert choose_ring(1000, 600, link=None, **args) == "pass-q"  # 0.625 < 0.67
    slow = LinkFigures(latency_s=1e-3, bandwidth_bytes_per_s=1e7, attention_flops_per_s=1e11)  # hides from T ~ 13k
    fast = LinkFigures(latency_s=1e-6, bandwidth_bytes_per_s=1e11, attention_flops_per_s=1e10)
    assert choose_ring(1000, 9000, link=slow, **args) == "pass-q"
    assert choose_ring(1000, 9000, link=fast, **args) == "pass-kv"  # the KV block hides under the attention
    # a prefix hit changes the answer for the same prompt
    assert choose_ring(3000, 0, link=slow, **args) == "pass-kv"
    assert choose_ring(600, 2400, link=slow, **args) == "pass-q"


@pytest.mark.parametrize("t", [1, 37, 4096])
def test_ring_rule_latency_free_matches_paper(t):
    """With zero latency, rule (1) is the paper's T >= N * C * NKV * e / (2 * NH * BW)."""
    link = LinkFigures(0.0, 1e9, 1e11)
    n, nh, nkv, e = 2, 32, 8, 2
    paper = t >= n * link.attention_flops_per_s * nkv * e / (2 * nh * link.bandwidth_bytes_per_s)
    got = choose_ring(t, 100 * t, n, nh, nkv, 128, e, link)
    assert (got == "pass-kv") == paper


def test_planner_divides_kv_by_cp_and_plans_a_long_prompt_at_cp2():
    """The planner's KV per token per rank is 1/cp; a prompt whose KV exceeds one rank's pool is planned at
    cp = 2 (the smallest layout that fits: with one KV head, tp replicates the KV and cannot help), and its
    prefill cost carries the ring's transfers."""
    from meshlm.config import ModelConfig
    from meshlm.plan import cluster as clusters
    from meshlm.plan.cost import Model
    from meshlm.plan.layout import Layout, Workload, rank_shares
    from meshlm.plan.memory import check
    from meshlm.plan.report import dry_run, fitting_layout

    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 1, "vocab_size": 128256, "max_position_embeddings": 131072})
    h100 = clusters.resolve("8xH100")
    one = rank_shares(cfg, Layout(), "bfloat16")[0].kv_bytes_per_token
    assert one == 2 * 32 * 1 * 128 * 2  # K+V x layers x KV heads x dim x bf16
    assert rank_shares(cfg, Layout(cp=4), "bfloat16")[0].kv_bytes_per_token == one // 4
    work = Workload(prompt_tokens=100_000, output_tokens=100, batch=1)
    budget = 60_000 * one  # a per-rank KV pool of 60k tokens
    assert not check(cfg, Layout(), h100, work, "bfloat16", budget).ok
    assert check(cfg, Layout(cp=2), h100, work, "bfloat16", budget).ok
    assert fitting_layout(cfg, h100, work, "bfloat16", budget) == Layout(cp=2)
    ok, text = dry_run(cfg, Layout(), h100, work, "bfloat16", budget)
    assert not ok and "--cp 2" in text
    m1, m2 = Model(cfg, Layout(), h100, "bfloat16"), Model(cfg, Layout(cp=2), h100, "bfloat16")
    assert m1.ring(work.prompt_tokens) == 0 < m2.ring(work.prompt_tokens)
    assert m2.prefill(work).compute < m1.prefill(work).compute  # half the tokens per rank


def test_ring_choices_are_exported_to_prometheus():
    """/metrics counts the context-parallel prefills by the ring chosen."""
    from meshlm.engine.engine import EngineStats
    from meshlm.serve.engine_loop import Snapshot
    from meshlm.serve.metrics import ServerMetrics, parse_samples

    snap = Snapshot(EngineStats(cp_ring_choices={"pass-kv": 3, "pass-q": 2}))
    s = parse_samples(ServerMetrics(lambda: snap).render().decode())
    assert s['meshlm_cp_ring_choices_total{ring="pass-kv"}'] == 3
    assert s['meshlm_cp_ring_choices_total{ring="pass-q"}'] == 2


def test_plan_search_at_a_cp_degree():
    """`meshlm plan --cp 2`: every candidate splits the context in 2 (pp included: each stage its own cp ranks); a
    cp that does not divide the devices is refused naming the fix."""
    from meshlm.config import ModelConfig
    from meshlm.errors import ConfigError
    from meshlm.plan import cluster as clusters
    from meshlm.plan.layout import Workload
    from meshlm.plan.search import layouts, search

    h100 = clusters.resolve("8xH100")
    assert {(x.dp * x.tp, x.pp, x.cp) for x in layouts(h100, cp=2)} == {(4, 1, 2), (2, 2, 2), (1, 4, 2)}
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1024,
                               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                               "vocab_size": 1000, "max_position_embeddings": 65536})
    plan = search(cfg, h100, Workload(prompt_tokens=60000, output_tokens=100), "bfloat16", cp=2)
    assert plan.chosen is not None and all(c.layout.cp == 2 for c in plan.ranked + plan.rejected)
    with pytest.raises(ConfigError, match="--cp 3 does not divide the cluster's 8 devices"):
        layouts(h100, cp=3)


def test_planner_cp_with_pp():
    """cp x pp: a rank holds its stage's layers' KV / cp; each stage splits its prefill over its cp ranks and adds
    its own ring (the stages' rings sum to the unstaged ring) and its decode merge; the layouts are candidates."""
    from meshlm.config import ModelConfig
    from meshlm.plan import cluster as clusters
    from meshlm.plan.cost import Model
    from meshlm.plan.layout import Layout, Workload, rank_shares
    from meshlm.plan.memory import check
    from meshlm.plan.search import search

    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072})
    h100 = clusters.resolve("8xH100")
    both = Layout(pp=2, cp=2)
    shares = rank_shares(cfg, both, "bfloat16")
    assert [r.stage for r in shares] == [0, 1]
    for r in shares:
        assert r.kv_bytes_per_token == 2 * r.layers * 8 * 128 * 2 // 2  # K+V x stage layers x heads x dim x bf16 / cp
    work = Workload(prompt_tokens=100_000, output_tokens=100, batch=1)
    budget = 60_000 * max(r.kv_bytes_per_token for r in rank_shares(cfg, Layout(pp=2), "bfloat16"))
    assert not check(cfg, Layout(pp=2), h100, work, "bfloat16", budget).ok
    assert check(cfg, both, h100, work, "bfloat16", budget).ok
    flat, staged, pipe = (Model(cfg, lay, h100, "bfloat16") for lay in (Layout(cp=2), both, Layout(pp=2)))
    ctx = work.prompt_tokens
    assert staged.ring(ctx, 0) > 0 and staged.ring(ctx, 1) > 0
    assert staged.ring(ctx, 0) + staged.ring(ctx, 1) == pytest.approx(flat.ring(ctx))
    pre, pre_pp = staged.prefill(work), pipe.prefill(work)
    assert pre.compute < pre_pp.compute and pre.collectives > pre_pp.collectives  # half the tokens, plus the ring
    assert staged.decode(work).collectives > pipe.decode(work).collectives  # the per-layer merge of partials
    plan = search(cfg, h100, work, "bfloat16", cp=2)
    assert any(c.layout.pp > 1 for c in plan.ranked)
