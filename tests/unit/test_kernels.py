"""meshlm.kernels: packed Linear layers dispatching to the kernel (its arithmetic: test_quant_kernels.py),
the fused norm / RoPE against the reference's op-by-op PyTorch, and the fallbacks that must stay exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meshlm import kernels
from meshlm.models.layers import Linear


@pytest.fixture(scope="module")
def op():
    """The compiled ops (built on first use, cached afterwards), or skip where they cannot be built."""
    got = kernels.kernel()
    if got is None:
        pytest.skip("the CPU kernels are unavailable here (no AVX-512, no compiler, or MESHLM_KERNELS=0)")
    return got


def _packed(layer: torch.nn.Linear) -> torch.nn.Linear:
    kernels.pack_linears(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_dispatch_and_fallbacks(op, dtype):
    """A packed Linear runs the kernel for decode and prefill rows alike; a plain one is F.linear bit for bit."""
    plain = Linear(64, 48, bias=True).to(dtype)
    ref_w, ref_b = plain.weight.detach().clone(), plain.bias.detach().clone()
    x = torch.randn(2, 9, 64).to(dtype)
    with torch.inference_mode():
        assert torch.equal(plain(x), F.linear(x, ref_w, ref_b))
        layer = _packed(plain)
        assert layer.weight.quant.n == 48 and layer.weight.quant.k == 64
        with torch.profiler.profile() as prof:
            out = layer(x)
        assert "meshlm_kernels::quant_linear_many" in {e.name for e in prof.events()}
        torch.testing.assert_close(out.float(), F.linear(x, ref_w, ref_b).float(),
                                   rtol=2**-7 if dtype is torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_linear_many_equals_each_linear(op, m):
    """q/k/v (or gate/up) in one call give exactly what each layer gives alone, biases included."""
    g = torch.Generator().manual_seed(m)
    layers = [_packed(Linear(96, n, bias=b).bfloat16()) for n, b in ((96, True), (32, True), (32, False))]
    x = torch.randn(1, m, 96, generator=g).bfloat16()
    with torch.inference_mode():
        many = kernels.linear_many(x, layers)
        for layer, got in zip(layers, many):
            assert torch.equal(got, layer(x))


def _ref_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k", [(1, 576), (7, 768), (33, 100)])
def test_rms_norm_matches_reference_ops(op, dtype, rows, k):
    """Same roundings as the reference; only the order of the fp32 sum of squares may differ."""
    g = torch.Generator().manual_seed(rows * k)
    x = (3 * torch.randn(rows, k, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    ours, ref = kernels.rms_norm(x, w, 1e-5), _ref_norm(x, w, 1e-5)
    assert ours.dtype == dtype and ours.shape == ref.shape
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(ours.float(), ref.float(), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,h,d", [(1, 9, 64), (5, 3, 64), (17, 4, 128)])
def test_rope_matches_reference_ops_exactly(op, dtype, s, h, d):
    """x * cos + rotate_half(x) * sin, each product rounded to the dtype as the reference does."""
    g = torch.Generator().manual_seed(s * h * d)
    x = torch.randn(2, s, h, d, generator=g).to(dtype)
    cos, sin = (torch.randn(2, s, 1, d, generator=g).to(dtype) for _ in range(2))
    half = d // 2
    ref = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    assert torch.equal(kernels.apply_rope(x.clone(), cos, sin), ref)
    assert torch.equal(kernels.apply_rope(x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin), ref)


def test_disabled_by_env(monkeypatch):
    """MESHLM_KERNELS=0 turns the kernel off before it is built."""
    monkeypatch.setenv("MESHLM_KERNELS", "0")
    assert not kernels.enabled()


def test_tensor_parallel_linears_take_the_kernel(op):
    """The row-parallel projections (o_proj, down_proj) and the vocab-parallel head run packed weights
    through the kernel too."""
    from meshlm.parallel.comm import Comm
    from meshlm.parallel.styles import RowParallelLinear, VocabParallelHead

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, 2048, generator=g).bfloat16()
    one = Comm("single", [0], None, 0)  # a group of one: the collective is the identity
    for cls, bias in ((RowParallelLinear, True), (VocabParallelHead, False)):
        layer = Linear(2048, 96, bias=bias).bfloat16()
        ref = F.linear(x, layer.weight, layer.bias).float()
        layer.__class__, layer.comm = cls, one
        if cls is VocabParallelHead:
            layer.sizes = [96]
        kernels.pack_linears(layer)
        with torch.inference_mode(), torch.profiler.profile() as prof:
            got = layer(x)
        ran = {e.name for e in prof.events()}
        assert "meshlm_kernels::quant_linear_many" in ran and "aten::mm" not in ran, (cls.__name__, sorted(ran))
        torch.testing.assert_close(got.float(), ref, rtol=2**-7, atol=1e-2)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed midway leaves torch's lock file; an old one must not make every later build wait
    forever, while a lock young enough to be a build in progress is left to torch's own wait."""
    import os
    import time

    import torch.utils.cpp_extension as ext

    from meshlm.kernels import build

    src = tmp_path / "k.cpp"
    src.write_text("// nothing")
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    seen = []
    monkeypatch.setattr(ext, "load", lambda **kw: seen.append((tmp_path / "lock").exists()))
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    build.load_extension("t_", [src], [], "test kernel")
    assert seen == [False]  # removed before the build started
    lock.touch()  # a build in progress
    build.load_extension("t_", [src], [], "test kernel")
    assert seen == [False, True]


def test_packed_weights_move_onto_huge_pages():
    """to_huge_pages copies parameters, in order, into one 2 MB-aligned buffer advised MADV_HUGEPAGE: same
    objects, values, shapes, dtypes and attributes, each 64-byte aligned."""
    from meshlm.kernels import qformat as qf
    from meshlm.kernels.pages import HUGE_PAGE, to_huge_pages

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g)
    q4 = qf.quant_weight(qf.quantize_rows(w, qf.Q4_1), qf.Q4_1, 64)
    ps = [qf.float_weight(w), qf.float_weight(w[:17].bfloat16()), q4]
    before, objs = [p.detach().clone() for p in ps], [id(p) for p in ps]
    if not to_huge_pages(ps):
        pytest.skip("madvise(MADV_HUGEPAGE) is not available here (not Linux, or THP disabled)")
    ptrs = [p.data_ptr() for p in ps]
    assert ptrs[0] % HUGE_PAGE == 0 and ptrs == sorted(ptrs) and all(q % 64 == 0 for q in ptrs)
    assert [id(p) for p in ps] == objs and ps[2].quant.fmt is qf.Q4_1
    for p, b in zip(ps, before):
        assert p.dtype == b.dtype and torch.equal(p, b)
