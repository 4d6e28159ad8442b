"""How a model's weights are stored, and the bytes each weight costs in memory and in the decode stream.

A float weight costs its dtype's bytes; a kept block format costs its block bytes over 32 weights (a
float16 scale, Q4_1 also a float16 minimum, then the quants), as meshlm.kernels.qformat stores them:
    F32 4, BF16 / F16 2, Q8_0 34/32, Q4_0 18/32, Q4_1 20/32 bytes per weight.
The decoder layers' matmul weights and the embedding / output head may differ (a llama.cpp Q4 file keeps
its embedding at Q8_0); norms, biases and MoE routers stay in the compute dtype.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from meshlm.errors import ConfigError

BLOCK = 32  # weights per quantization block, every kept format
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 4 + 16}  # scale(s) + quants per block
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZE = {"int8": "Q8_0", "int4": "Q4_0", "int4-min": "Q4_1"}  # --quantize name -> kept format
# GGUF types the loader converts at load (checkpoint/quantized.py CONVERT) -> the kept format they become
CONVERT = {"Q6_K": "Q8_0", "Q5_K": "Q8_0", "Q5_0": "Q8_0", "Q5_1": "Q8_0", "Q4_K": "Q4_1", "Q3_K": "Q4_1",
           "Q2_K": "Q4_1"}


def bytes_per_weight(fmt: str) -> float:
    """Bytes one weight of a format costs: a float dtype name or a kept block format."""
    if fmt in FLOAT_BYTES:
        return float(FLOAT_BYTES[fmt])
    if fmt in BLOCK_BYTES:
        return BLOCK_BYTES[fmt] / BLOCK
    raise ConfigError(f"weight format {fmt!r} is unknown; use one of {', '.join([*FLOAT_BYTES, *BLOCK_BYTES])}.")


@dataclass(frozen=True)
class WeightFormat:
    """Storage of the decoder layers' matmul weights and of the embedding / head; None: the compute dtype."""

    layers: str | None = None
    embed: str | None = None

    def __post_init__(self) -> None:
        for f in (self.layers, self.embed):
            if f is not None:
                bytes_per_weight(f)

    def layer_bytes(self, dtype: str) -> float:
        """Bytes per matmul weight of a decoder layer."""
        return bytes_per_weight(self.layers or dtype)

    def embed_bytes(self, dtype: str) -> float:
        """Bytes per weight of the embedding and the output head."""
        return bytes_per_weight(self.embed or dtype)

    def describe(self, dtype: str) -> str:
        """'Q4_1 layers, Q8_0 embedding' (or the one format when both agree)."""
        layers, embed = self.layers or dtype, self.embed or dtype
        return layers if layers == embed else f"{layers} layers, {embed} embedding"

    @classmethod
    def quantized(cls, name: str) -> WeightFormat:
        """--quantize NAME as the loader applies it: the layers' matmuls in its format, the embedding / head
        in it too but never under Q8_0 (checkpoint/quantized.py VOCAB_MIN)."""
        if name not in QUANTIZE:
            raise ConfigError(f"--quantize {name!r} is unknown; use one of {', '.join(QUANTIZE)}.")
        fmt = QUANTIZE[name]
        return cls(layers=fmt, embed=fmt if bytes_per_weight(fmt) >= bytes_per_weight("Q8_0") else "Q8_0")


def kept(gguf_type: str) -> str | None:
    """The format a GGUF tensor type loads as under --dtype auto: a kept block format as stored, the others
    converted (CONVERT); None for float types (they load in the compute dtype)."""
    return gguf_type if gguf_type in BLOCK_BYTES else CONVERT.get(gguf_type)


def gguf_format(path: str | Path) -> WeightFormat:
    """The formats a GGUF file's weights load as under --dtype auto: its layers' commonest matmul type, its
    embedding's (token_embd, or output when the head is separate, the larger of the two); float types count
    as the compute dtype."""
    from gguf import GGUFReader

    layers: Counter[str] = Counter()
    embed: list[str] = []
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) < 2:
            continue
        if t.name.startswith("blk.") and "ffn_gate_inp" not in t.name:
            layers[t.tensor_type.name] += int(t.n_elements)
        elif t.name.split(".")[0] in ("token_embd", "output"):
            embed.append(t.tensor_type.name)
    top = layers.most_common(1)[0][0] if layers else None
    big = max(embed, key=lambda n: bytes_per_weight(kept(n) or "float32")) if embed else None
    return WeightFormat(kept(top) if top else None, kept(big) if big else None)
