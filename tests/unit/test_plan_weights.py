"""The planner's bytes per weight per format: the kernels' own block sizes, a GGUF file's real size, and
the decode stream of a quantized model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_plan_cost import ideal
from test_plan_memory import LLAMA3_8B, cfg

from meshlm.cli import main
from meshlm.errors import ConfigError
from meshlm.plan import cluster as clusters
from meshlm.plan import weights as pw
from meshlm.plan.cost import estimate
from meshlm.plan.layout import Layout, Workload, rank_shares
from meshlm.plan.memory import check

WORK = Workload(prompt_tokens=16, output_tokens=2)


def test_bytes_per_weight_are_the_kernels_formats():
    """plan/weights.py (no torch) repeats qformat's block sizes and --quantize names; they agree."""
    from meshlm.kernels import qformat

    assert pw.BLOCK == qformat.BLOCK
    assert set(pw.BLOCK_BYTES) == set(qformat.FORMATS)
    for name, fmt in qformat.FORMATS.items():
        assert pw.bytes_per_weight(name) == fmt.block_bytes / qformat.BLOCK == fmt.bits_per_weight / 8
    assert pw.QUANTIZE == {k: f.name for k, f in qformat.QUANTIZE.items()}
    from meshlm.checkpoint.quantized import CONVERT, VOCAB_MIN

    assert pw.CONVERT == {k: f.name for k, f in CONVERT.items()}
    assert VOCAB_MIN.name == "Q8_0"  # WeightFormat.quantized's floor for the vocabulary
    assert [pw.bytes_per_weight(f) for f in ("float32", "bfloat16", "float16", "Q8_0", "Q4_0", "Q4_1")] == \
        [4, 2, 2, 34 / 32, 18 / 32, 20 / 32]
    with pytest.raises(ConfigError, match="Q8_0"):
        pw.WeightFormat(layers="Q3_K")


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
def test_memory_counts_each_weight_in_its_format(fmt):
    """Llama-3-8B, matmuls of the 32 layers in fmt, embedding and head Q8_0, norms in bfloat16."""
    h, layers, inter, vocab = 4096, 32, 14336, 128256
    matmul = 2 * h * 32 * 128 + 2 * h * 8 * 128 + 3 * h * inter  # q, o, k, v, gate, up, down
    want = layers * (matmul * pw.bytes_per_weight(fmt) + 2 * h * 2) + 2 * vocab * h * 34 / 32 + h * 2
    rep = check(cfg(LLAMA3_8B), Layout(), clusters.resolve("8xH100"), WORK, "bfloat16",
                weights=pw.WeightFormat(fmt, "Q8_0"))
    assert rep.weights == pytest.approx(want, rel=1e-12)
    assert rep.kv_per_token == 2 * layers * 8 * 128 * 2  # the KV cache stays in the compute dtype


def test_decode_streams_the_quantized_bytes():
    """Bandwidth-bound batch-1 decode: Q4_0 layers save (2 - 18/32) bytes per matmul weight of the stream."""
    c = ideal(clusters.resolve("8xH100"))
    model = cfg(LLAMA3_8B)
    bf16 = estimate(model, Layout(8, 1, 1), c, WORK, "bfloat16")
    q4 = estimate(model, Layout(8, 1, 1), c, WORK, "bfloat16", pw.WeightFormat(layers="Q4_0"))
    share = rank_shares(model, Layout(), "bfloat16")[0]
    matmul = share.layer_params - 2 * 4096  # less the two norms
    bw = 3350e9 * 0.8
    assert bf16.decode.bound == q4.decode.bound == "bandwidth"
    assert bf16.decode.total - q4.decode.total == pytest.approx(32 * matmul * (2 - 18 / 32) / bw, rel=1e-9)
    assert q4.throughput > 3 * bf16.throughput * 0.8  # the layers dominate: ~3.3x fewer bytes per token


def test_the_bundled_gguf_is_planned_at_its_file_size():
    """SmolLM2's Q4_1 file: its layers Q4_1, its tied embedding Q8_0; the planned weights are the bytes of
    the file's tensors (norms F32)."""
    from gguf import GGUFReader

    from meshlm.checkpoint.cache import default_gguf_path
    from meshlm.plan.cli import model_config

    path = default_gguf_path()
    fmt = pw.gguf_format(path)
    assert fmt == pw.WeightFormat("Q4_1", "Q8_0")
    model, _ = model_config(str(path))
    rep = check(model, Layout(), clusters.resolve("cpu-host"), WORK, "float32", weights=fmt)
    assert rep.weights == sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def test_gguf_format_reads_a_written_file(tmp_path):
    """A file the gguf package writes: Q4_0 layers, a Q8_0 embedding; Q6_K layers plan as the Q8_0 they
    convert to, F32 ones as the compute dtype."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf.quants import quantize

    def write(name: str, layer_type: T) -> str:
        w = GGUFWriter(str(tmp_path / name), "llama")
        rng = np.random.default_rng(0)
        for tname, kind in (("token_embd.weight", T.Q8_0), ("blk.0.attn_q.weight", layer_type),
                            ("blk.0.ffn_down.weight", layer_type)):
            x = rng.standard_normal((64, 256)).astype(np.float32)
            if kind == T.Q6_K:  # gguf cannot quantize to it: any bytes of the right size (210 per 256 weights)
                data = rng.integers(0, 256, (64, 210), dtype=np.uint8)
            else:
                data = x if kind == T.F32 else quantize(x, kind)
            w.add_tensor(tname, data, raw_dtype=kind)
        w.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)

    assert pw.gguf_format(write("q4.gguf", T.Q4_0)) == pw.WeightFormat("Q4_0", "Q8_0")
    assert pw.gguf_format(write("k.gguf", T.Q6_K)) == pw.WeightFormat("Q8_0", "Q8_0")
    assert pw.gguf_format(write("f.gguf", T.F32)) == pw.WeightFormat(None, "Q8_0")


def test_plan_cli_takes_quantize_and_the_files_formats(capsys):
    """`meshlm plan` on the bundled model: its Q4_1/Q8_0 by default, --quantize int8 for the layers,
    an explicit --dtype dequantizes; the weights per rank follow."""
    def weights(*extra: str) -> tuple[str, float]:
        assert main(["plan", "--cluster", "cpu-host", "--json", *extra]) == 0
        data = json.loads(capsys.readouterr().out)
        return data["weights"], data["chosen"]["memory"]["weights"]

    kept, q8, f32 = weights(), weights("--quantize", "int8"), weights("--dtype", "float32")
    assert kept[0] == "Q4_1 layers, Q8_0 embedding" and q8[0] == "Q8_0"
    assert f32[0] == "float32"
    assert kept[1] < q8[1] < f32[1]
    assert pw.WeightFormat.quantized("int4") == pw.WeightFormat("Q4_0", "Q8_0")
    assert pw.WeightFormat.quantized("int8") == pw.WeightFormat("Q8_0", "Q8_0")


@pytest.mark.parametrize("mode", list(pw.QUANTIZE))
def test_planned_bytes_are_what_quantize_loads(checkpoint, mode):
    """--quantize on a float model: the planner's weight bytes are the bytes of the parameters the loader
    builds (packed blocks, the vocabulary at Q8_0 or more, norms float32)."""
    from meshlm import LLM
    from meshlm.plan.cli import model_config

    path = checkpoint("llama_gqa")
    model, _ = model_config(str(path))
    planned = check(model, Layout(), clusters.resolve("cpu-host"), WORK, "float32",
                    weights=pw.WeightFormat.quantized(mode)).weights
    with LLM(str(path), quantize=mode, progress=False) as q:
        loaded = sum(p.numel() * p.element_size() for p in q.model.parameters())
    assert planned == loaded
