"""GGUF files (llama.cpp): tensors dequantized to float32 under Hugging Face names, config, tokenizer."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from meshlm.checkpoint.source import Slice
from meshlm.errors import CheckpointError

log = logging.getLogger(__name__)

# Each is checked against ggml's reference dequantization in tests/unit/test_gguf.py.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "ffn_gate_inp": "block_sparse_moe.gate"}
_EXPERT_W = {"gate": "w1", "down": "w2", "up": "w3"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|down|up)(?:_exps|\.(\d+))\.weight$")  # stacked or one expert


def open_gguf(path: str | Path) -> GGUFReader:
    """Memory-map a GGUF file, turning every failure into a CheckpointError that names the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist. Check the path, or download the file again.")
    st = path.stat()
    return _open_cached(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)  # parsing the metadata takes seconds (100k vocabulary strings); do it once
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). Pass a .gguf file from "
            "llama.cpp, or a Hugging Face folder with safetensors weights."
        )
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on cut-off metadata
        raise CheckpointError(f"Cannot parse GGUF file {path}: {e}. It is truncated or corrupt; download it "
                              "again.") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"GGUF file {path} is truncated: tensor {t.name!r} runs past its end "
                                  f"({size} bytes). Download it again.")
    return reader


def _reader(src: str | Path | GGUFReader) -> GGUFReader:
    return src if isinstance(src, GGUFReader) else open_gguf(src)


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(src: str | Path | GGUFReader) -> dict[str, Any]:
    """A Hugging Face config.json dict built from GGUF metadata."""
    r = _reader(src)
    arch = _meta(r, "general.architecture", "")
    experts = int(_meta(r, f"{arch}.expert_count", 0) or 0)
    hf_arch = "MixtralForCausalLM" if arch == "llama" and experts else _ARCHS.get(arch)
    if hf_arch is None or (arch == "qwen2" and experts):
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; meshlm reads GGUF files of "
                              f"{', '.join(_ARCHS)} (llama with experts = Mixtral). Use one of these.")

    def get(key: str, default: Any = None) -> Any:
        return _meta(r, f"{arch}.{key}", default)

    def need(key: str) -> int:
        if (value := get(key)) is None:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}; the file is incomplete. Convert or "
                                  "download it again with a current llama.cpp.")
        return int(value)

    heads = need("attention.head_count")
    kv = get("attention.head_count_kv", heads)
    if isinstance(kv, list):  # per-layer counts: meshlm needs them all equal
        if len(set(kv)) != 1:
            raise CheckpointError(f"GGUF file has per-layer KV head counts {sorted(set(kv))}; meshlm needs "
                                  "one count for all layers. Use a model with uniform attention.")
        kv = kv[0]
    names = {t.name for t in r.tensors}
    tokens = r.fields.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens.data) if tokens else 0)
    cfg: dict[str, Any] = {
        "architectures": [hf_arch], "model_type": hf_arch.removesuffix("ForCausalLM").lower(),
        "_name_or_path": Path(r.data.filename).stem if getattr(r.data, "filename", None) else "",
        "vocab_size": int(vocab), "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"), "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": int(kv),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _meta(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(r, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else None)
    if head_dim:
        cfg["head_dim"] = int(head_dim)
    if experts:
        cfg["num_local_experts"] = experts
        cfg["num_experts_per_tok"] = int(get("expert_used_count", 2))
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        cfg["rope_scaling"] = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
        if original := get("rope.scaling.original_context_length"):
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif "rope_freqs.weight" in names:  # llama 3.1+: per-frequency factors stored instead of the parameters
        factors = dequantize(next(t for t in r.tensors if t.name == "rope_freqs.weight").data, Q.F32)
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(np.max(factors)),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
        log.info("GGUF rope_freqs tensor read as llama3 RoPE scaling %s", cfg["rope_scaling"])
    return cfg


@dataclass(frozen=True)
class _Entry:
    tensor: ReaderTensor
    expert: int | None  # index into a stacked [E, ...] tensor
    head_rows: int  # rows per head to un-permute (llama q/k), 0 for none


class GGUFSource:
    """TensorSource over a .gguf file: Hugging Face names and shapes; read() gives float32 values, stored()
    the file's own rows (meshlm/checkpoint/quantized.py keeps quantized ones as they are)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.config = gguf_hf_config(self.reader)
        permute = self.config["model_type"] in ("llama", "mixtral")
        heads = {"q_proj": self.config["num_attention_heads"], "k_proj": self.config["num_key_value_heads"]}
        self._entries: dict[str, _Entry] = {}
        for t in self.reader.tensors:
            if (m := _EXPS.match(t.name)) is not None:
                layer, w, one = m.groups()
                prefix = f"model.layers.{layer}.block_sparse_moe.experts"
                ids = [int(one)] if one is not None else range(int(t.shape[-1]))
                for e in ids:  # a stacked tensor is indexed by expert; a single-expert one is not
                    entry = _Entry(t, e if one is None else None, 0)
                    self._entries[f"{prefix}.{e}.{_EXPERT_W[w]}.weight"] = entry
            elif (m := _BLK.match(t.name)) is not None and m.group(2) in _BLOCK:
                layer, kind, wb = m.groups()
                name = f"model.layers.{layer}.{_BLOCK[kind]}.{wb}"
                proj = _BLOCK[kind].rpartition(".")[2]
                rows = int(t.shape[-1])  # GGUF dims are reversed: the last is the row count
                self._entries[name] = _Entry(t, None, rows // heads[proj] if permute and proj in heads else 0)
            elif t.name in _TOP:
                self._entries[_TOP[t.name]] = _Entry(t, None, 0)
            else:
                log.debug("GGUF tensor %s has no Hugging Face counterpart; ignored", t.name)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        e = self._entry(name)
        dims = tuple(int(d) for d in reversed(e.tensor.shape.tolist()))
        return dims[1:] if e.expert is not None else dims

    def tensor_type(self, name: str) -> Q:
        """The GGML type a tensor is stored in."""
        return self._entry(name).tensor.tensor_type

    def stored(self, name: str, part: Slice | None = None) -> tuple[torch.Tensor, int]:
        """The stored rows of `part` as in the file (GGUF bytes for quantized types; q/k rows in Hugging
        Face order) and the first column they hold: a column slice widens to whole blocks of the type,
        and only those bytes are read."""
        e = self._entry(name)
        data = e.tensor.data if e.expert is None else e.tensor.data[e.expert]  # rows x (bytes or elements)
        c0 = lo = 0
        if part is not None and part.dim == 1:
            bs, ts = GGML_QUANT_SIZES[e.tensor.tensor_type]
            c0, c1 = part.start // bs * bs, -(-part.stop // bs) * bs
            raw = data.dtype == np.uint8  # quantized (and BF16) rows are bytes; F32/F16 rows are values
            data = data[:, c0 // bs * ts:c1 // bs * ts] if raw else data[:, c0:c1]
        elif part is not None and part.dim == 0:
            # Rows are independent in every type, so a row range reads alone. Widen it to whole heads:
            # the q/k permutation mixes rows within each head.
            h = e.head_rows or 1
            lo, hi = part.start // h * h, -(-part.stop // h) * h
            data = data[lo:hi]
        rows = torch.from_numpy(np.array(data))  # the copy reads these bytes of the mapping, no others
        if e.head_rows:
            rows = _unpermute(rows, e.head_rows)
        if part is not None and part.dim == 0:
            rows = rows[part.start - lo:part.stop - lo]
        return rows, c0

    def read(self, name: str, part: Slice | None = None) -> torch.Tensor:
        rows, c0 = self.stored(name, part)
        x = self._dequantize(name, self._entry(name).tensor, rows.numpy())
        if part is not None and part.dim == 1:
            x = x[:, part.start - c0:part.stop - c0]
        return x.contiguous()

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r} (in Hugging Face naming). The GGUF is "
                                  "incomplete or for another architecture; use a matching file.") from None

    def _dequantize(self, name: str, t: ReaderTensor, data: np.ndarray) -> torch.Tensor:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"GGUF tensor {t.name!r} ({name}) in {self.path} is {t.tensor_type.name}, which meshlm "
                f"cannot load (supported: {', '.join(q.name for q in SUPPORTED_TYPES)}; Q8_0, Q4_0 and Q4_1 run "
                "as stored, other quantized types convert at load). Re-quantize the model to a supported type, "
                "e.g. `llama-quantize in-f16.gguf out.gguf Q8_0` (or Q4_0, Q4_K_M)."
            )
        out = dequantize(np.asarray(data), t.tensor_type).astype(np.float32, copy=False)
        return torch.from_numpy(out if out.flags.writeable else out.copy())


def _unpermute(x: torch.Tensor, head_rows: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (r/2, 2) -> (2, r/2); rows are whole heads."""
    # llama.cpp: w.reshape(n_head, 2, r/2, ...).swapaxes(1, 2).reshape(w.shape); this is its inverse.
    return x.reshape(-1, head_rows // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


# llama.cpp's pre-tokenizer regexes, keyed by tokenizer.ggml.pre; others use GPT-2's (ByteLevel's own).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2)}
# llama.cpp splits single digits off first, then applies GPT-2's regex (as SmolLM2's tokenizer.json does).
_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(rest)}


def gguf_tokenizer(src: str | Path | GGUFReader) -> tuple[HFTokenizer, dict[str, Any]]:
    """The byte-level BPE tokenizer and a tokenizer_config dict (chat template, BOS/EOS) of a GGUF."""
    r = _reader(src)
    kind = _meta(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer type {kind!r} is not supported; meshlm builds byte-level BPE ('gpt2') "
            "tokenizers from GGUF metadata only. Use the model's Hugging Face folder (with tokenizer.json)."
        )
    tokens: list[str] = _meta(r, "tokenizer.ggml.tokens")
    types: list[int] = _meta(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _meta(r, "tokenizer.ggml.merges", [])]
    spell = _byte_spelling()
    alphabet = set(spell.values())
    spelled = [set(t) <= alphabet for t in tokens]  # False: stored raw; respelled as bytes, like transformers
    vocab = {t if ok else "".join(spell[b] for b in t.encode()): i
             for i, (t, ok) in enumerate(zip(tokens, spelled))}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(_meta(r, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # 3 = control (<|im_start|>), 4 = user-defined (<think>): matched whole, never split by BPE.
    # A raw-spelled one is a llama.cpp mislabel; adding it would grow the vocabulary (transformers skips it).
    marked = [(t, ty) for t, ty, ok in zip(tokens, types, spelled) if ok and ty in (3, 4)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in marked if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in marked if ty == 4])

    def token(key: str) -> str | None:
        i = _meta(r, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"chat_template": _meta(r, "tokenizer.chat_template"), "bos_token": token("bos_token_id"),
              "eos_token": token("eos_token_id"), "unk_token": token("unknown_token_id"),
              "pad_token": token("padding_token_id"),
              "add_bos_token": bool(_meta(r, "tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(_meta(r, "tokenizer.ggml.add_eos_token", False))}
    return tok, config
