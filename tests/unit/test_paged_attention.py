"""Paged decode attention: the C++ kernel and the PyTorch path against SDPA over gathered keys."""

from __future__ import annotations

import math

import pytest
import torch

from meshlm.engine import paged_decode
from meshlm.engine.paged_attention import PagedKVCache, SeqInput, StepInput
from meshlm.models.layers import sdpa

BS, HKV, HQ, D = 4, 2, 6, 32


def reference(q, kp, vp, table, first, ctx, bs=BS):
    """SDPA over the visible keys of one sequence, gathered; q [Hq, D] -> [Hq, D] (fp32)."""
    pos = torch.arange(first, ctx)
    slots = torch.tensor(table)[pos // bs] * bs + pos % bs
    k, v = (p.index_select(0, slots).float().transpose(0, 1)[None] for p in (kp, vp))
    return sdpa(q.float()[None, :, None], k, v, None)[0, :, 0]


def attend(cache, q, k, v):
    """The cache's layer 0 on q [1, T, Hq, D], k/v [1, T, Hkv, D] with RoPE at angle 0 (cos 1, sin 0: an
    exact identity, so the keys written are k) -> [T, Hq, D]."""
    t = q.shape[1]
    cos, sin = torch.ones(1, t, 1, q.shape[-1], dtype=q.dtype), torch.zeros(1, t, 1, q.shape[-1], dtype=q.dtype)
    return cache(0, q.flatten(2), k.flatten(2), v.flatten(2), cos, sin)[0].view(t, -1, q.shape[-1])


def random_batch(dtype, seed=0, bs=BS, d=D, lens=(1, 5, 17, 33, 9), firsts=(0, 0, 6, 20, 0)):
    g = torch.Generator().manual_seed(seed)
    blocks = sum(-(-n // bs) for n in lens) + 3
    kp, vp = (torch.randn(blocks * bs, HKV, d, generator=g).to(dtype) for _ in range(2))
    order = torch.randperm(blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        tables.append(tuple(order[used:used + -(-n // bs)]))
        used += len(tables[-1])
    q = torch.randn(len(lens), HQ, d, generator=g).to(dtype)
    return q, kp, vp, tables, list(firsts), list(lens)


# (block size, head_dim, context lengths, first visible token): the AVX-512 path takes 16-row tiles, so blocks
# smaller and larger than 16 rows, tiles cut short by the context's end, starts inside a block (sliding
# window), and head_dim 32 / 64 / 128 (its vector widths) and 24 (the portable path).
CASES = [
    (BS, 32, (1, 5, 17, 33, 9), (0, 0, 6, 20, 0)),
    (16, 64, (1, 16, 17, 300, 47), (0, 0, 3, 37, 16)),
    (32, 128, (2, 31, 33, 100, 64), (0, 5, 0, 70, 40)),
    (8, 24, (1, 9, 30), (0, 2, 11)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,d,lens,firsts", CASES)
def test_kernel_matches_sdpa_and_is_batch_invariant(dtype, bs, d, lens, firsts):
    """Each row equals SDPA over its gathered keys (to rounding), and is bitwise the same computed alone."""
    op = paged_decode.kernel()
    if op is None:
        pytest.skip("the paged decode kernel could not be built here")
    q, kp, vp, tables, firsts, lens = random_batch(dtype, bs=bs, d=d, lens=lens, firsts=firsts)
    width = max(map(len, tables))
    tab = torch.tensor([t + (0,) * (width - len(t)) for t in tables])
    out = op(q, kp, vp, tab, torch.tensor(firsts), torch.tensor(lens), bs, 1 / math.sqrt(d))
    tol = 1e-5 if dtype is torch.float32 else 1e-2
    for b in range(len(lens)):
        torch.testing.assert_close(out[b].float(), reference(q[b], kp, vp, tables[b], firsts[b], lens[b], bs),
                                   atol=tol, rtol=tol)
        alone = op(q[b:b + 1], kp, vp, tab[b:b + 1], torch.tensor(firsts[b:b + 1]), torch.tensor(lens[b:b + 1]),
                   bs, 1 / math.sqrt(d))
        assert torch.equal(alone[0], out[b])


def test_kernel_softmax_takes_large_score_ranges():
    """Scores spread over hundreds (one key far above the rest, others far below) still match SDPA: the
    vector exp returns exactly 0 below its range and no overflow above."""
    op = paged_decode.kernel()
    if op is None:
        pytest.skip("the paged decode kernel could not be built here")
    q, kp, vp, tables, firsts, lens = random_batch(torch.float32, seed=3, bs=16, d=64, lens=(40,), firsts=(0,))
    kp = kp.clone()
    kp[:, :, :] *= 30.0  # scores of order +-200 after scaling
    tab = torch.tensor([tables[0]])
    out = op(q, kp, vp, tab, torch.tensor(firsts), torch.tensor(lens), 16, 1 / 8.0)
    ref = reference(q[0], kp, vp, tables[0], 0, 40, 16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_mixed_step_matches_reference(monkeypatch, use_kernel):
    """A step with decodes, a first prompt chunk and a later chunk (sliding window) attends like SDPA."""
    if not use_kernel:
        monkeypatch.setattr(paged_decode, "_tried", True)
        monkeypatch.setattr(paged_decode, "_op", None)
    elif paged_decode.kernel() is None:
        pytest.skip("the paged decode kernel could not be built here")
    window = 10
    cache = PagedKVCache([0], 40, BS, HKV, D, torch.float32, window=window)
    g = torch.Generator().manual_seed(1)
    # Cached context: sequence A has 13 tokens, B has 6; this step adds A: 1 (decode), B: 5, C: 7 (new).
    ctx_a, ctx_b = 13, 6
    tables = {"a": (3, 7, 1, 9), "b": (0, 5, 11), "c": (2, 8)}
    seqs = (SeqInput(0, ctx_a, 1, tables["a"]), SeqInput(1, ctx_b, 5, tables["b"]), SeqInput(6, 0, 7, tables["c"]))
    for name, n in (("a", ctx_a), ("b", ctx_b)):
        pos = torch.arange(n)
        slots = torch.tensor(tables[name])[pos // BS] * BS + pos % BS
        cache.k[0, slots] = torch.randn(n, HKV, D, generator=g)
        cache.v[0, slots] = torch.randn(n, HKV, D, generator=g)
    q = torch.randn(1, 13, HQ, D, generator=g)
    k, v = torch.randn(1, 13, HKV, D, generator=g), torch.randn(1, 13, HKV, D, generator=g)
    cache.prepare(StepInput(tuple(range(13)), seqs, ()))
    out = attend(cache, q, k, v)
    for s, name in zip(seqs, "abc"):
        ctx = s.start + s.n
        pos = torch.arange(ctx)
        slots = torch.tensor(tables[name])[pos // BS] * BS + pos % BS
        keys, vals = cache.k[0, slots].transpose(0, 1)[None], cache.v[0, slots].transpose(0, 1)[None]
        qpos = torch.arange(s.start, ctx)[:, None]
        mask = (pos[None] <= qpos) & (pos[None] > qpos - window)  # [n, ctx]
        ref = sdpa(q[0, s.offset:s.offset + s.n].transpose(0, 1)[None], keys, vals, mask)[0].transpose(0, 1)
        torch.testing.assert_close(out[s.offset:s.offset + s.n], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_unwritten_slots_are_never_read(monkeypatch, use_kernel):
    """The pool is torch.empty (pages touched only when written): fill it with NaN, write two sequences of
    different lengths, and decode both in one step. Neither the kernel nor the padded PyTorch batch may read
    an unwritten slot (a masked NaN still poisons a softmax sum), so the rows are finite and match SDPA."""
    if not use_kernel:
        monkeypatch.setattr(paged_decode, "_tried", True)
        monkeypatch.setattr(paged_decode, "_op", None)
    elif paged_decode.kernel() is None:
        pytest.skip("the paged decode kernel could not be built here")
    cache = PagedKVCache([0], 40, BS, HKV, D, torch.float32)
    assert (cache.kernel is not None) == use_kernel
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    g = torch.Generator().manual_seed(2)
    tables = {"a": (5, 2, 9), "b": (7,)}  # block 0 (the old padding slot) is never written
    cached = {"a": 9, "b": 2}  # tokens already in the pool; this step decodes one more of each
    for name, n in cached.items():
        pos = torch.arange(n)
        slots = torch.tensor(tables[name])[pos // BS] * BS + pos % BS
        cache.k[0, slots] = torch.randn(n, HKV, D, generator=g)
        cache.v[0, slots] = torch.randn(n, HKV, D, generator=g)
    seqs = (SeqInput(0, cached["a"], 1, tables["a"]), SeqInput(1, cached["b"], 1, tables["b"]))
    q = torch.randn(1, 2, HQ, D, generator=g)
    k, v = torch.randn(1, 2, HKV, D, generator=g), torch.randn(1, 2, HKV, D, generator=g)
    cache.prepare(StepInput((1, 2), seqs, (0, 1)))
    out = attend(cache, q, k, v)
    assert torch.isfinite(out).all()
    for s, name in zip(seqs, "ab"):
        ctx = s.start + 1
        ref = reference(q[0, s.offset], cache.k[0], cache.v[0], tables[name], 0, ctx)
        torch.testing.assert_close(out[s.offset], ref, atol=1e-5, rtol=1e-5)
