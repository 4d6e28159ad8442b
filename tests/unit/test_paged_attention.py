"""Paged decode attention: the C++ kernel and the PyTorch path against SDPA over gathered keys."""

from __future__ import annotations

import math

import pytest
import torch

from meshlm.engine import paged_decode
from meshlm.engine.paged_attention import PagedKVCache, SeqInput, StepInput
from meshlm.models.layers import sdpa

BS, HKV, HQ, D = 4, 2, 6, 32


def reference(q, kp, vp, table, first, ctx):
    """SDPA over the visible keys of one sequence, gathered; q [Hq, D] -> [Hq, D] (fp32)."""
    pos = torch.arange(first, ctx)
    slots = torch.tensor(table)[pos // BS] * BS + pos % BS
    k, v = (p.index_select(0, slots).float().transpose(0, 1)[None] for p in (kp, vp))
    return sdpa(q.float()[None, :, None], k, v, None)[0, :, 0]


def random_batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kp, vp = (torch.randn(40 * BS, HKV, D, generator=g).to(dtype) for _ in range(2))
    lens, firsts = [1, 5, 17, 33, 9], [0, 0, 6, 20, 0]
    order = torch.randperm(40, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        tables.append(tuple(order[used:used + -(-n // BS)]))
        used += len(tables[-1])
    q = torch.randn(len(lens), HQ, D, generator=g).to(dtype)
    return q, kp, vp, tables, firsts, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_sdpa_and_is_batch_invariant(dtype):
    """Each row equals SDPA over its gathered keys (to rounding), and is bitwise the same computed alone."""
    op = paged_decode.kernel()
    if op is None:
        pytest.skip("the paged decode kernel could not be built here")
    q, kp, vp, tables, firsts, lens = random_batch(dtype)
    width = max(map(len, tables))
    tab = torch.tensor([t + (0,) * (width - len(t)) for t in tables])
    out = op(q, kp, vp, tab, torch.tensor(firsts), torch.tensor(lens), BS, 1 / math.sqrt(D))
    tol = 1e-5 if dtype is torch.float32 else 1e-2
    for b in range(len(lens)):
        torch.testing.assert_close(out[b].float(), reference(q[b], kp, vp, tables[b], firsts[b], lens[b]),
                                   atol=tol, rtol=tol)
        alone = op(q[b:b + 1], kp, vp, tab[b:b + 1], torch.tensor(firsts[b:b + 1]), torch.tensor(lens[b:b + 1]),
                   BS, 1 / math.sqrt(D))
        assert torch.equal(alone[0], out[b])


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
    out = cache(0, q, k, v)[0]
    for s, name in zip(seqs, "abc"):
        ctx = s.start + s.n
        pos = torch.arange(ctx)
        slots = torch.tensor(tables[name])[pos // BS] * BS + pos % BS
        keys, vals = cache.k[0, slots].transpose(0, 1)[None], cache.v[0, slots].transpose(0, 1)[None]
        qpos = torch.arange(s.start, ctx)[:, None]
        mask = (pos[None] <= qpos) & (pos[None] > qpos - window)  # [n, ctx]
        ref = sdpa(q[0, s.offset:s.offset + s.n].transpose(0, 1)[None], keys, vals, mask)[0].transpose(0, 1)
        torch.testing.assert_close(out[s.offset:s.offset + s.n], ref, atol=1e-5, rtol=1e-5)
