"""Quantized weights (kernels/qformat.py, quant.py, quant.cpp) against ggml's reference (the gguf package):
the block formats and packing, the VNNI kernel against dequantize-then-matmul in float64, batch invariance,
and the PyTorch path used off the kernel (CUDA, CPUs without VNNI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlm import kernels
from meshlm.kernels import qformat as qf
from meshlm.kernels import quant

FMTS = list(qf.FORMATS.values())


def _rows(n: int, k: int, fmt: qf.QFormat, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGUF bytes, their float32 values by ggml's reference dequantizer) of a random [n, k] weight."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    rows = qf.quantize_rows(w, fmt)
    return rows, qf.dequantize_rows_reference(rows, fmt)


def _x_int8(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernel sees it: int8 per 32-block (d = max|x| / 127, round half to even), float64."""
    m, k = x.shape
    b = x.float().reshape(m, k // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d).reshape(m, k).double()


@pytest.fixture(scope="module")
def ops():
    """The compiled quantized kernel, or skip where this CPU or build cannot have it."""
    if quant._kernel() is None:
        pytest.skip("the quantized kernel needs AVX-512 VNNI and a compiler (or MESHLM_KERNELS=0 is set)")
    return quant._kernel()


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FMTS), n=st.integers(1, 70), blocks=st.integers(1, 6), seed=st.integers(0, 99))
def test_formats_match_ggml(fmt, n, blocks, seed):
    """Our torch dequantizer equals ggml's reference bit for bit, and packing round-trips."""
    rows, ref = _rows(n, 32 * blocks, fmt, seed)
    assert torch.equal(qf.dequantize_rows(rows, fmt), ref)
    packed = qf.pack(rows, fmt)
    assert packed.shape == (-(-n // 16), blocks, 16 * fmt.block_bytes)
    assert torch.equal(qf.unpack(packed, fmt, n), rows)
    assert torch.equal(qf.dequantize_weight(qf.quant_weight(rows, fmt, 32 * blocks)), ref)


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(FMTS), m=st.sampled_from([1, 2, 3, 4, 5, 8, 17]), n=st.integers(1, 80),
       blocks=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       bias=st.booleans(), seed=st.integers(0, 999))
def test_kernel_matches_dequantized_matmul(ops, fmt, m, n, blocks, dtype, bias, seed):
    """The kernel equals x_int8 @ dequant(w).T + b (float64) up to fp32 accumulation order (and the
    output's bf16 rounding)."""
    k = 32 * blocks
    rows, w = _rows(n, k, fmt, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    out = ops.quant_linear_many(x, [qf.quant_weight(rows, fmt, k)], [fmt.code], [n], [b])[0]
    assert out.dtype == dtype and out.shape == (m, n)
    ref = _x_int8(x) @ w.double().T + (b.double() if bias else 0)
    mag = _x_int8(x).abs() @ w.double().abs().T + 1  # scale of each sum's terms
    tol = 1e-6 * mag * blocks + (2**-8 * ref.abs() if dtype is torch.bfloat16 else 0)
    assert ((out.double() - ref).abs() <= tol).all(), f"max |err| {(out.double() - ref).abs().max():.3e}"


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_kernel_rows_are_batch_invariant(ops, fmt):
    """A row's output is bit-identical whatever rows surround it (decode, batched decode, prefill)."""
    rows, _ = _rows(100, 576, fmt, 7)
    w = qf.quant_weight(rows, fmt, 576)
    x = torch.randn(37, 576)
    whole = ops.quant_linear_many(x, [w], [fmt.code], [100], [None])[0]
    for i in (0, 5, 36):
        alone = ops.quant_linear_many(x[i:i + 1].contiguous(), [w], [fmt.code], [100], [None])[0]
        assert torch.equal(alone[0], whole[i])


def test_many_weights_in_one_call_equal_separate_calls(ops):
    """qlinear_many (q/k/v in one call, mixed formats) gives what one call per weight gives."""
    x = torch.randn(3, 64)
    ws = [qf.quant_weight(_rows(n, 64, f, n)[0], f, 64) for n, f in ((40, qf.Q4_0), (16, qf.Q8_0), (9, qf.Q4_1))]
    together = quant.qlinear_many(x, ws, [None] * 3)
    for w, t in zip(ws, together):
        assert torch.equal(quant.qlinear(x, w), t)


def test_torch_path_is_dequantize_then_linear(monkeypatch):
    """Without the kernel (CUDA, no VNNI), a quantized Linear is exactly F.linear over the dequantized
    weight, with a tensor-parallel shard's zero padding applied to x."""
    monkeypatch.setattr(quant, "_kernel", lambda: None)
    rows, w = _rows(24, 96, qf.Q4_1, 3)
    layer = kernels.Linear(80, 24)
    layer.weight = qf.quant_weight(rows, qf.Q4_1, 96, pad=(10, 6))
    x = torch.randn(2, 5, 80)
    ref = F.linear(F.pad(x, (10, 6)), w, layer.bias)
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_padded_shard_matches_the_unpadded_columns(ops, fmt):
    """A row-wise shard storing whole blocks and padding x with zeros equals the product over its own
    columns only (the head boundary inside a block case)."""
    rows, w = _rows(20, 128, fmt, 11)
    x = torch.randn(2, 128)
    x[:, :20] = 0
    x[:, 100:] = 0  # the shard owns columns 20..100 of blocks 0..3
    padded = quant.qlinear(x[:, 20:100], qf.quant_weight(rows, fmt, 128, pad=(20, 28)))
    assert torch.equal(padded, quant.qlinear(x, qf.quant_weight(rows, fmt, 128)))


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_embedding_rows(fmt):
    """Embedding lookups read the packed table's rows exactly as ggml dequantizes them."""
    rows, ref = _rows(50, 64, fmt, 5)
    ids = torch.tensor([[0, 15, 16], [49, 33, 0]])
    got = quant.embedding(ids, qf.quant_weight(rows, fmt, 64), torch.float32)
    assert torch.equal(got, ref[ids])


@pytest.mark.parametrize("fmt", [*FMTS, qf.F32, qf.BF16], ids=lambda f: f.name)
def test_kernel_rows_equal_the_pytorch_rows(ops, fmt):
    """The kernel's row lookup (embeddings on CPU) gives the PyTorch path's bits, every row of a table whose
    row count is not a multiple of the 16-row group; a row outside the table is refused."""
    if fmt in qf.FLOATS.values():
        p = qf.float_weight(torch.randn(37, 96).to(next(d for d, f in qf.FLOATS.items() if f is fmt)))
    else:
        p = qf.quant_weight(_rows(37, 96, fmt, 3)[0], fmt, 96)
    ids = torch.randperm(37)
    assert torch.equal(ops.packed_rows(p, fmt.code, ids), qf.rows_of(p, ids))
    with pytest.raises(RuntimeError, match="outside the weight"):
        ops.packed_rows(p, fmt.code, torch.tensor([48]))


@settings(max_examples=40, deadline=None)
@given(wdtype=st.sampled_from([torch.float32, torch.bfloat16]), xdtype=st.sampled_from([torch.float32, torch.bfloat16]),
       m=st.sampled_from([1, 2, 3, 4, 5, 9]), n=st.integers(1, 70), k=st.integers(1, 200), bias=st.booleans(),
       seed=st.integers(0, 999))
def test_float_kernel_matches_linear(ops, wdtype, xdtype, m, n, k, bias, seed):
    """Packed float32/bfloat16 weights: the kernel equals x @ w.T + b in float64 up to fp32 summation order
    (then one rounding to x's dtype)."""
    k += k % 2 if wdtype is torch.bfloat16 else 0
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(wdtype)
    x = torch.randn(m, k, generator=g).to(xdtype)
    b = torch.randn(n, generator=g) if bias else None
    p = qf.float_weight(w)
    assert torch.equal(qf.dequantize_weight(p), w.float())
    out = ops.quant_linear_many(x, [p], [p.quant.fmt.code], [n], [b])[0]
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    tol = 1e-6 * (x.double().abs() @ w.double().abs().T + 1) + (2**-8 * ref.abs() if xdtype is torch.bfloat16 else 0)
    assert out.dtype == xdtype and ((out.double() - ref).abs() <= tol).all()
    alone = ops.quant_linear_many(x[-1:].contiguous(), [p], [p.quant.fmt.code], [n], [b])[0]
    assert torch.equal(alone[0], out[-1])  # batch invariant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_embedding_rows(dtype):
    """A packed float table (a tied head's) gives back its rows exactly."""
    w = torch.randn(40, 64).to(dtype)
    ids = torch.tensor([3, 39, 16, 0])
    assert torch.equal(quant.embedding(ids, qf.float_weight(w), dtype), w[ids])


@pytest.mark.parametrize("fmt", [*FMTS, qf.F32, qf.BF16], ids=lambda f: f.name)
def test_two_threads_give_what_one_gives(ops, fmt):
    """Rows split over threads (several groups per weight, several weights per call) change nothing."""
    w = torch.randn(200, 128)
    if fmt in qf.FLOATS.values():
        p = qf.float_weight(w.to(next(d for d, f in qf.FLOATS.items() if f is fmt)))
    else:
        p = qf.quant_weight(qf.quantize_rows(w, fmt), fmt, 128)
    x = torch.randn(5, 128)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(quant.qlinear_many(x, [p, p], [None, None]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    torch.testing.assert_close(outs[0][0], x @ qf.dequantize_weight(p).T, rtol=0.05, atol=0.5)
