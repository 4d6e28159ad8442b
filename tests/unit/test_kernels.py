"""meshlm.kernels: the AVX-512 bf16 GEMV against F.linear, the fused norm / RoPE against the reference's
op-by-op PyTorch, and the fallbacks that must stay exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meshlm import kernels
from meshlm.models.layers import Linear

SHAPES = [(1, 2), (5, 18), (7, 100), (37, 34), (256, 768), (768, 2048), (2048, 576)]  # (N, K)


@pytest.fixture(scope="module")
def op():
    """The compiled op (built on first use, cached afterwards), or skip where it cannot be built."""
    got = kernels.kernel()
    if got is None:
        pytest.skip("the GEMV kernel is unavailable here (no AVX-512, no compiler, or MESHLM_KERNELS=0)")
    return got.small_m_linear


@pytest.mark.parametrize("m", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_matches_f_linear(op, m, n, k, bias):
    """Within one bf16 rounding of F.linear: both sum in fp32, only the order differs."""
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (0.05 * torch.randn(n, k, generator=g)).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    ours, ref = op(x, w, b).float(), F.linear(x, w, b).float()
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    tol = 2**-7 * ref.abs() + 1e-3 * ref.abs().max()
    assert ((ours - ref).abs() <= tol).all(), f"max |err| {(ours - ref).abs().max():.3e}"


def test_linear_dispatch_and_fallbacks(op):
    """bf16 decode rows use the kernel; fp32, prefill-sized inputs and autograd take F.linear bit for bit."""
    layer = Linear(64, 48, bias=True)
    x32 = torch.randn(3, 1, 64)
    with torch.inference_mode():
        assert torch.equal(layer(x32), F.linear(x32, layer.weight, layer.bias))  # fp32 always F.linear
        big = torch.randn(2, 9, 64)  # 18 rows > MAX_M (8)
        assert torch.equal(layer(big), F.linear(big, layer.weight, layer.bias))
    layer = layer.bfloat16()
    with torch.inference_mode():
        x = torch.randn(1, 1, 64).bfloat16()
        out = layer(x)
        assert out.shape == (1, 1, 48) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), F.linear(x, layer.weight, layer.bias).float(),
                                   rtol=2**-7, atol=1e-2)
    xg = torch.randn(1, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(xg).sum().backward()  # the op has no autograd formula, so training-mode calls must fall back
    assert xg.grad is not None and xg.grad.shape == xg.shape


@pytest.mark.parametrize("m", [1, 3, 8])
def test_linear_many_equals_each_linear(op, m):
    """q/k/v (or gate/up) in one call give exactly what each layer gives alone, biases included."""
    g = torch.Generator().manual_seed(m)
    layers = [Linear(96, n, bias=b).bfloat16() for n, b in ((96, True), (32, True), (32, False))]
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
    """The row-parallel projections (o_proj, down_proj) and the vocab-parallel head run decode-sized bf16
    rows through the kernel too (they once called F.linear: oneDNN, at half the bandwidth, at tp > 1)."""
    from meshlm.parallel.comm import Comm
    from meshlm.parallel.styles import RowParallelLinear, VocabParallelHead

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, 2048, generator=g).bfloat16()
    one = Comm("single", [0], None, 0)  # a group of one: the collective is the identity
    for cls, bias in ((RowParallelLinear, True), (VocabParallelHead, False)):
        layer = torch.nn.Linear(2048, 96, bias=bias).bfloat16()
        layer.__class__, layer.comm = cls, one
        if cls is VocabParallelHead:
            layer.sizes = [96]
        with torch.inference_mode(), torch.profiler.profile() as prof:
            got = layer(x)
        ran = {e.name for e in prof.events()}
        assert "meshlm_kernels::small_m_linear" in ran and "aten::mm" not in ran, (cls.__name__, sorted(ran))
        torch.testing.assert_close(got.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=2**-7, atol=1e-2)


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
