"""Decode under context parallelism: the paged kernel's partial (output and log-sum-exp) against PyTorch, and a
cp rank's in-place walk of its round-robin shard merging to attention over the whole context."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlm.engine import paged_decode
from meshlm.engine.cp_attention import ContextParallelKVCache
from meshlm.engine.paged_attention import SeqInput, StepInput
from meshlm.parallel.context import kv_slot, merge_partials, partial_attention


def lse_op():
    op = paged_decode.kernel_lse()
    if op is None:
        pytest.skip("the paged decode kernel could not be built here")
    return op


def reference(q, kp, vp, table, first, ctx, bs, scale):
    """Softmax over tokens [first, ctx) of one table, gathered: q [Hq, D] -> out [Hq, D], lse [Hq] (fp32);
    no token: out 0, lse -inf."""
    hq, d = q.shape
    pos = torch.arange(first, max(first, ctx))
    slots = torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs
    k, v = (p.index_select(0, slots).float().repeat_interleave(hq // p.shape[1], dim=1) for p in (kp, vp))
    s = torch.einsum("hd,thd->ht", q.float(), k) * scale  # [Hq, M]
    lse = torch.logsumexp(s, dim=-1)
    if len(pos) == 0:
        return torch.zeros(hq, d), lse
    return torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v), lse


@settings(max_examples=40, deadline=None)
@given(bs=st.sampled_from([1, 4, 16, 32]), d=st.sampled_from([24, 32, 64, 128]), hkv=st.integers(1, 3),
       g=st.integers(1, 4), rows=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 90)), min_size=1, max_size=6),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_lse_matches_pytorch(bs, d, hkv, g, rows, bf16, seed):
    """Every row's output and per-head LSE equal softmax/logsumexp over its visible keys of a random block
    table, an empty range (first >= len) giving out 0 and lse -inf; the output equals the whole op's."""
    op = lse_op()
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    ranges = [(min(a, b), max(a, b)) if i % 2 else (max(a, b), min(a, b)) for i, (a, b) in enumerate(rows)]
    width = -(-91 // bs)
    blocks = width * len(ranges)
    kp, vp = (torch.randn(blocks * bs, hkv, d, generator=gen).to(dtype) for _ in range(2))
    tables = torch.randperm(blocks, generator=gen).view(len(ranges), width)
    q = torch.randn(len(ranges), hkv * g, d, generator=gen).to(dtype)
    first, lens = (torch.tensor(x, dtype=torch.long) for x in zip(*ranges))
    scale = 1 / math.sqrt(d)
    out, lse = op(q, kp, vp, tables, first, lens, bs, scale)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    tol = 1e-5 if dtype is torch.float32 else 1e-2
    for b, (a, c) in enumerate(ranges):
        ro, rl = reference(q[b], kp, vp, tables[b].tolist(), a, c, bs, scale)
        torch.testing.assert_close(out[b], ro, atol=tol, rtol=tol)
        torch.testing.assert_close(lse[b], rl, atol=1e-5, rtol=1e-5)  # -inf matches -inf
    live = lens > first
    if bool(live.any()):  # the same walk as the decode op: identical outputs
        whole = paged_decode.kernel()(q[live], kp, vp, tables[live], first[live], lens[live], bs, scale)
        assert torch.equal(whole, out[live].to(whole.dtype))


@pytest.mark.parametrize("cp,window", [(2, None), (4, None), (3, 7)])
def test_shard_walk_merges_to_whole_attention(cp, window):
    """Each cp rank's pool holds its round-robin shard (kv_slot); a step of decodes and a verification run,
    with contexts shorter than cp (some ranks see nothing), read in place per rank and merged by LSE, equals
    attention over each row's whole visible context, and each rank's partial equals the gathered fallback's."""
    op = lse_op()
    bs, hkv, g, d, nblocks = 4, 2, 3, 32, 12
    gen = torch.Generator().manual_seed(cp)
    scale = 1 / math.sqrt(d)
    # (cached tokens, new tokens, sampled rows): decodes at positions 0, 1, 5, 30 and a 4-row verification
    specs = [(0, 1), (1, 1), (5, 1), (30, 1), (9, 4)]
    seqs, sample, off, used = [], [], 0, 0
    for start, n in specs:
        blocks = -(-(start + n) // (bs * cp))
        seqs.append(SeqInput(off, start, n, tuple(range(used, used + blocks))))
        sample.extend(range(off, off + n))
        off, used = off + n, used + blocks
    step = StepInput(tuple(range(off)), tuple(seqs), tuple(sample))
    total = max(s.start + s.n for s in seqs)
    keys = [torch.randn(total, hkv, d, generator=gen) for _ in seqs]  # every position's K/V, per sequence
    vals = [torch.randn(total, hkv, d, generator=gen) for _ in seqs]
    q = torch.randn(off, hkv * g, d, generator=gen)
    parts = []
    for r in range(cp):
        cache = ContextParallelKVCache([0], nblocks, bs, hkv, d, torch.float32, "cpu", window,
                                       SimpleNamespace(size=cp, index=r), "auto", None, hkv * g)
        cache.k.fill_(float("nan"))  # a slot read that this rank never wrote poisons the result
        cache.v.fill_(float("nan"))
        for s, k, v in zip(seqs, keys, vals):
            for p in range(r, s.start + s.n, cp):
                cache.k[0, kv_slot(p, s.block_table, bs, cp)] = k[p]
                cache.v[0, kv_slot(p, s.block_table, bs, cp)] = v[p]
        cache.prepare(step)
        rep = cache.rep
        assert rep["rows"].tolist() == list(range(off))
        o, lse = op(q, cache.k[0], cache.v[0], rep["tables"], rep["first"], rep["len"], bs, scale)
        cache.partial = None  # the gathered fallback (other devices) on the same step
        cache.prepare(step)
        fo, fl = partial_attention(q, cache.k[0].index_select(0, cache.rep["kslots"]),
                                   cache.v[0].index_select(0, cache.rep["kslots"]), cache.rep_plan, scale, fused=False)
        torch.testing.assert_close(o, fo, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, fl, atol=1e-5, rtol=1e-5)
        parts.append((o, lse))
    out, _ = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    for s, k, v in zip(seqs, keys, vals):
        for i in range(s.n):
            qp = s.start + i
            lo = 0 if window is None else max(0, qp + 1 - window)
            kk, vv = (x[lo:qp + 1].repeat_interleave(g, dim=1) for x in (k, v))  # [M, Hq, D]
            w = torch.softmax(torch.einsum("hd,thd->ht", q[s.offset + i], kk) * scale, dim=-1)
            torch.testing.assert_close(out[s.offset + i], torch.einsum("ht,thd->hd", w, vv), atol=1e-5, rtol=1e-5)
