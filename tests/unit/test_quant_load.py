"""Quantized weights at load: GGUF Q8_0/Q4_0/Q4_1 kept as stored, K-quants converted with the error reported,
--quantize on float models, bad combinations refused, and each rank's share read as whole 32-blocks."""

from __future__ import annotations

import pytest
import torch
from helpers import ACTIVATION_ROUNDING, write_gguf_model

from meshlm import LLM
from meshlm.checkpoint.gguf import GGUFSource
from meshlm.checkpoint.source import Slice
from meshlm.errors import CheckpointError, ConfigError
from meshlm.kernels.qformat import (
    FORMATS,
    QUANTIZE,
    dequantize_rows_reference,
    dequantize_weight,
    info,
    pack_float,
    unpack,
)

pytest.importorskip("gguf")
PROMPTS = [[5, 6, 7, 8, 9], [17, 3, 250, 499]]
K_DIMS = dict(hidden=256, inter=512, heads=4, kv_heads=2, head_dim=64)  # K-quant rows are 256-blocks


def _dense(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a plain float32 tensor (float weights may be packed for the CPU kernel)."""
    return {n: dequantize_weight(p) if info(p) is not None else p for n, p in model.named_parameters()}


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """Relative RMS error of ours against ref at most rel."""
    err = ((ours - ref).square().mean() / ref.square().mean()).sqrt().item()
    assert err <= rel, f"relative RMS error {err:.4f} > {rel}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random llama GGUF files, one per stored type."""
    root = tmp_path_factory.mktemp("qgguf")
    return lambda qtype, **kw: write_gguf_model(root / f"{qtype}-{len(kw)}.gguf", qtype, **kw)


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_kept_types_load_quantized(files, qtype):
    """Every linear/embedding weight stays in the file's blocks, bit for bit, q/k rows un-permuted as whole
    byte rows; norms stay float; logits match the dequantized-float32 load of the same file."""
    path = files(qtype)
    with LLM(str(path), progress=False) as q, LLM(str(path), dtype="float32", progress=False) as f:
        floats = _dense(f.model)
        packed = 0
        for name, p in q.model.named_parameters():
            if "norm" in name:
                assert p.dtype is torch.float32, name
                continue
            assert info(p) is not None and info(p).fmt.name == qtype, name
            assert torch.equal(dequantize_weight(p), floats[name]), name  # gguf's reference dequantization
            packed += 1
        assert packed == 2 * 7 + 2  # 7 linears a layer, the embedding and the (untied) head
        _close(q.logits(PROMPTS), f.logits(PROMPTS), ACTIVATION_ROUNDING)
        d = q.rank_info()[0]
        assert set(d["weight_mb_by_format"]) == {qtype, "float32"} and d["conversion_error"] == {}
        assert d["weight_mb"] < f.rank_info()[0]["weight_mb"] * FORMATS[qtype].bits_per_weight / 32 + 0.01


def test_packed_rows_are_the_files_bytes(files):
    """The packed weight unpacks to the file's rows (q rows moved as whole byte rows, never requantized)."""
    path = files("Q4_0")
    src = GGUFSource(path)
    with LLM(str(path), progress=False) as q:
        w = q.model.layers["0"].self_attn.q_proj.weight
        rows = unpack(w, info(w).fmt, info(w).n)
        stored, _ = src.stored("model.layers.0.self_attn.q_proj.weight")
        assert torch.equal(rows, stored)
        assert torch.equal(dequantize_rows_reference(rows, info(w).fmt),
                           src.read("model.layers.0.self_attn.q_proj.weight"))


@pytest.mark.parametrize("qtype,kept", [("Q6_K", "Q8_0"), ("Q4_K", "Q4_1")])
def test_k_quants_convert_with_the_error_reported(files, qtype, kept, caplog):
    """K-quants convert to the nearest kept format; the relative RMS error against the file's own values is
    logged once and reported by describe()."""
    path = files(qtype, **K_DIMS)
    with LLM(str(path), progress=False) as q, LLM(str(path), dtype="float32", progress=False) as f:
        floats = _dense(f.model)
        err = ref = 0.0
        for name, p in q.model.named_parameters():
            if info(p) is not None:
                assert info(p).fmt.name == kept
                err += (dequantize_weight(p) - floats[name]).double().square().sum().item()
                ref += floats[name].double().square().sum().item()
        report = q.rank_info()[0]["conversion_error"]
        assert list(report) == [f"{qtype}->{kept}"]
        assert report[f"{qtype}->{kept}"] == pytest.approx((err / ref) ** 0.5, rel=1e-6)
        assert 0 < report[f"{qtype}->{kept}"] < 0.05
        assert torch.isfinite(q.logits(PROMPTS)).all()
    assert sum(f"{qtype}->{kept}" in r.message for r in caplog.records if r.levelname == "WARNING") == 1


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "TQ1_0"])
def test_unsupported_type_is_refused(files, qtype):
    path = files("Q8_0", **K_DIMS, raw={"blk.1.ffn_up.weight": qtype})
    with pytest.raises(CheckpointError, match=rf"blk\.1\.ffn_up\.weight.*{qtype}.*Q8_0.*Q4_0.*Q4_1.*llama-quantize"):
        LLM(str(path), progress=False)


def test_float_dtype_dequantizes_everything(files):
    with LLM(str(files("Q4_1")), dtype="bfloat16", progress=False) as b:
        assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16}
        assert {info(p).fmt.name for p in b.model.parameters() if info(p) is not None} <= {"BF16"}


def test_stored_column_slice_reads_whole_blocks(files):
    """A row-parallel shard's columns [40, 100) read blocks 1..3 only (bytes 34..136 of each Q8_0 row)."""
    src = GGUFSource(files("Q8_0"))
    name = "model.layers.0.mlp.down_proj.weight"
    rows, c0 = src.stored(name, Slice(1, 40, 100))
    full, _ = src.stored(name)
    assert c0 == 32 and torch.equal(rows, full[:, 34:4 * 34])
    torch.testing.assert_close(src.read(name, Slice(1, 40, 100)), src.read(name)[:, 40:100], rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(QUANTIZE))
def test_quantize_float_model(checkpoint, mode):
    """--quantize on a safetensors model: every linear packed in the chosen format, the embedding/head in it
    too under int8, at Q8_0 under int4 / int4-min (as llama-quantize keeps its output tensor at >= 6 bits).
    Logits equal the float model's run on the same rounded weights (up to activation rounding), and stay near
    the float model's: this random model (weights N(0, 0.15), peaked logits) amplifies weight noise about 5x
    (measured: int8 0.5% -> 2.6%, int4 8.6% -> 45%), so the bound is 8x the weights' own relative RMS error,
    which is itself at most 1% (int8) or 12% (4 bits: 16 levels over each block's range)."""
    path = str(checkpoint("llama_gqa"))
    with LLM(path, quantize=mode, progress=False) as q, LLM(path, progress=False) as f:
        ref = f.logits(PROMPTS)
        err = total = 0.0
        floats, params = _dense(f.model), dict(f.model.named_parameters())
        for name, p in q.model.named_parameters():
            assert ("norm" in name) == (info(p) is None), name
            if info(p) is not None:
                vocab = name.startswith(("embed_tokens.", "lm_head.")) and mode != "int8"
                assert info(p).fmt is (QUANTIZE["int8"] if vocab else QUANTIZE[mode]), name
                rounded = dequantize_weight(p)
                err += (rounded - floats[name]).square().sum().item()
                total += floats[name].square().sum().item()
                params[name].data.copy_(pack_float(rounded) if info(params[name]) else rounded)  # f: same weights
        weight_err = (err / total) ** 0.5
        assert weight_err <= (0.01 if mode == "int8" else 0.12)
        ours = q.logits(PROMPTS)
        _close(ours, f.logits(PROMPTS), ACTIVATION_ROUNDING)
        _close(ours, ref, 8 * weight_err)


def test_quantize_keeps_odd_k_float(checkpoint, caplog):
    """A layer whose K is not a multiple of 32 stays float, with a note (llama_odd_heads: hidden 144)."""
    with caplog.at_level("INFO"), LLM(str(checkpoint("llama_odd_heads")), quantize="int8", progress=False) as q:
        kept = lambda w: info(w) is not None and info(w).fmt.name in FORMATS  # noqa: E731
        assert not kept(q.model.layers["0"].self_attn.q_proj.weight)  # K = hidden = 144: float
        assert kept(q.model.layers["0"].mlp.down_proj.weight)  # K = intermediate = 192
    assert any("stays float" in r.message for r in caplog.records)


def test_bad_combinations_are_refused(files, checkpoint):
    with pytest.raises(ConfigError, match="already quantized.*Leave --quantize out"):
        LLM(str(files("Q4_0")), quantize="int8", progress=False)
    with pytest.raises(ConfigError, match="int8, int4, int4-min"):
        LLM(str(checkpoint("llama_gqa")), quantize="int3", progress=False)
    with pytest.raises(ConfigError, match="use auto or one of"):
        LLM(str(checkpoint("llama_gqa")), dtype="int8", progress=False)


@pytest.mark.parametrize("qtype,dtype", [("BF16", torch.bfloat16), ("F32", torch.float32)])
def test_auto_keeps_a_float_files_precision(files, qtype, dtype):
    """--dtype auto on a float GGUF computes in the file's precision (a BF16 file is not widened to float32),
    giving what an explicit --dtype of that precision gives."""
    path = files(qtype)
    with LLM(str(path), progress=False) as auto, LLM(str(path), dtype=str(dtype)[6:], progress=False) as named:
        assert auto.dtype is dtype
        assert {p.dtype for n, p in auto.model.named_parameters() if "norm" not in n} == {dtype}
        ids = [[3, 17, 42, 99, 7]]
        assert torch.equal(auto.logits(ids), named.logits(ids))
