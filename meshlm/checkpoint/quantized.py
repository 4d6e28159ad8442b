"""Quantized weights at load time: a GGUF's Q8_0/Q4_0/Q4_1 blocks kept as stored, its other quantized types
converted to the nearest kept format (the error measured), and float weights quantized for --quantize.

Every weight is blocks of 32 along K (qformat.py). A rank's share of a weight is either a row range
(column-parallel layers, vocabulary shards: any row boundary works, rows are independent) or a column range
(row-parallel o_proj / down_proj). A column range that starts or ends inside a block (a head boundary at
head_dim 48, an uneven intermediate split) reads the whole blocks covering it and pads its input with zeros
there (QuantInfo.pad): the product is exact, and every rank holds blocks quantized as at tp=1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from meshlm.checkpoint.source import Slice, TensorSource
from meshlm.errors import ConfigError
from meshlm.kernels.qformat import (
    BLOCK,
    FORMATS,
    Q4_1,
    Q8_0,
    QUANTIZE,
    QFormat,
    dequantize_rows,
    quant_weight,
    quantize_rows,
)

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")
# GGUF types converted at load -> the kept format of at least their precision (bits per weight in brackets):
# Q6_K (6.6), Q5_K (5.5), Q5_0/Q5_1 (5.5/6) -> Q8_0 (8.5); Q4_K (4.5), Q3_K (3.4), Q2_K (2.6) -> Q4_1 (5).
CONVERT = {"Q6_K": Q8_0, "Q5_K": Q8_0, "Q5_0": Q8_0, "Q5_1": Q8_0, "Q4_K": Q4_1, "Q3_K": Q4_1, "Q2_K": Q4_1}
# --quantize int4 / int4-min store the vocabulary matrices (embedding, LM head) at Q8_0, as llama-quantize keeps
# its output tensor at 6 bits or more: on SmolLM2 (tied head) and the shipped text, int4 costs 1.20x float32's
# perplexity with a Q8_0 vocabulary, 1.35x with a Q4_0 one, against llama.cpp's Q4_0 file's 1.20x (test_quality).
VOCAB_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")
VOCAB_MIN = Q8_0


@dataclass(frozen=True)
class Precision:
    """How weights load: compute dtype, whether a GGUF's quantized tensors stay quantized, --quantize."""

    dtype: torch.dtype  # activations, KV cache, norms and float weights
    keep: bool  # GGUF quantized tensors stay quantized (--dtype auto)
    quantize: QFormat | None = None  # quantize float linear/embedding weights at load


def precision(dtype: str, quantize: str | None, dtypes: dict[str, torch.dtype]) -> Precision:
    """The Precision for --dtype (auto or a name in dtypes) and --quantize; a bad name fails naming the fix."""
    if dtype != "auto" and dtype not in dtypes:
        raise ConfigError(f"dtype {dtype!r} is not supported; use auto or one of {', '.join(dtypes)}.")
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"--quantize {quantize!r} is not supported; use one of {', '.join(QUANTIZE)} "
                          "(Q8_0, Q4_0 and Q4_1 blocks of 32), or leave it out for float weights.")
    return Precision(torch.float32 if dtype == "auto" else dtypes[dtype], dtype == "auto",
                     QUANTIZE[quantize] if quantize else None)


def file_precision(p: Precision, source: TensorSource) -> Precision:
    """--dtype auto keeps a GGUF's precision: a file whose float matrices are all BF16 computes in bfloat16
    (weights read as stored); any other file (F32, F16 or quantized) computes in float32."""
    if not p.keep:
        return p
    return replace(p, dtype=torch.bfloat16) if matrix_types(source) & set(FLOAT_TYPES) == {"BF16"} else p


def matrix_types(source: TensorSource) -> set[str]:
    """The GGUF types of a source's 2-D tensors (empty for safetensors)."""
    if not hasattr(source, "tensor_type"):
        return set()
    return {source.tensor_type(n).name for n in source.names() if len(source.shape(n)) == 2}


def quantized_types(source: TensorSource) -> set[str]:
    """GGUF types other than float among a source's 2-D tensors (empty for safetensors)."""
    return matrix_types(source) - set(FLOAT_TYPES)


def check_quantize(source: TensorSource, path: object, p: Precision) -> None:
    """--quantize needs float weights: refuse it on an already quantized GGUF (no double rounding)."""
    kinds = quantized_types(source) if p.quantize is not None else set()
    if kinds:
        raise ConfigError(
            f"{path} is already quantized ({', '.join(sorted(kinds))}); --quantize takes float weights only. "
            "Leave --quantize out to run the file's own blocks (the default, --dtype auto), or quantize the "
            "float model (a safetensors folder or an F16/F32 GGUF).")


@dataclass
class Conversions:
    """Relative RMS error of converted weights against the file's own dequantized values, per conversion."""

    sums: dict[str, list[float]] = field(default_factory=dict)  # "Q6_K->Q8_0": [sum err^2, sum ref^2, tensors]

    def add(self, key: str, ref: torch.Tensor, got: torch.Tensor) -> None:
        """Count one converted tensor: ref [N, K] the file's values, got its conversion."""
        s = self.sums.setdefault(key, [0.0, 0.0, 0])
        s[0] += float((got - ref).double().square().sum())
        s[1] += float(ref.double().square().sum())
        s[2] += 1

    def report(self) -> dict[str, float]:
        """{"Q6_K->Q8_0": relative RMS error} over every tensor converted so far."""
        return {k: (e / r) ** 0.5 if r else 0.0 for k, (e, r, _) in self.sums.items()}


def _cover(part: Slice | None, k: int) -> tuple[int, int]:
    """Columns [a, b) of the whole 32-blocks that hold part's columns (all k when part slices rows)."""
    if part is None or part.dim != 1:
        return 0, k
    return part.start // BLOCK * BLOCK, -(-part.stop // BLOCK) * BLOCK


def _pad(part: Slice | None, a: int, b: int) -> tuple[int, int]:
    return (part.start - a, b - part.stop) if part is not None and part.dim == 1 else (0, 0)


def gguf_weight(source, name: str, part: Slice | None, device, conversions: Conversions) -> nn.Parameter | None:
    """A packed weight from a GGUF's quantized tensor (kept, or converted to CONVERT's format); None for a
    float tensor or a type that read() must refuse."""
    kind = source.tensor_type(name).name
    fmt = FORMATS.get(kind) or CONVERT.get(kind)
    if fmt is None:
        return None
    rows, c0 = source.stored(name, part)  # part's rows; or whole blocks of the type covering its columns
    if kind in FORMATS:
        k = rows.shape[1] // fmt.block_bytes * BLOCK
        return quant_weight(rows, fmt, k, _pad(part, c0, c0 + k), device)
    from gguf.quants import dequantize

    ref = torch.from_numpy(dequantize(rows.numpy(), source.tensor_type(name)).copy())  # [N, superblocks]
    a, b = _cover(part, ref.shape[1] + c0)
    ref = ref[:, a - c0:b - c0]
    q = quantize_rows(ref, fmt)
    conversions.add(f"{kind}->{fmt.name}", ref, dequantize_rows(q, fmt))
    return quant_weight(q, fmt, b - a, _pad(part, a, b), device)


def quantized_float(source: TensorSource, name: str, part: Slice | None, fmt: QFormat,
                    device) -> nn.Parameter | None:
    """A float weight quantized to fmt (--quantize; the vocabulary matrices to at least VOCAB_MIN), or None
    when its K is no multiple of 32 (stays float)."""
    if name.endswith(VOCAB_WEIGHTS) and fmt.bits_per_weight < VOCAB_MIN.bits_per_weight:
        fmt = VOCAB_MIN
    k = source.shape(name)[1]
    if k % BLOCK:
        log.info("%s stays float: --quantize needs K a multiple of %d, it has %d", name, BLOCK, k)
        return None
    a, b = _cover(part, k)
    w = source.read(name, Slice(1, a, b) if part is not None and part.dim == 1 else part)
    return quant_weight(quantize_rows(w, fmt), fmt, b - a, _pad(part, a, b), device)


def load_quantized(source: TensorSource, name: str, part: Slice | None, p: Precision, device,
                   conversions: Conversions) -> nn.Parameter | None:
    """The packed weight `name` (checkpoint naming) loads as under p, or None when it loads as float."""
    if len(source.shape(name)) != 2:
        return None
    if p.keep and hasattr(source, "tensor_type"):
        w = gguf_weight(source, name, part, device, conversions)
        if w is not None:
            return w
    if p.quantize is not None:
        return quantized_float(source, name, part, p.quantize, device)
    return None


def describe_bytes(model: nn.Module) -> dict[str, int]:
    """Parameter bytes per storage format ("Q4_1", "float32", ...) of a loaded model, shared ones once."""
    from meshlm.kernels.qformat import info

    out: dict[str, int] = {}
    for p in model.parameters():  # parameters() yields a tied parameter once
        q = info(p)  # float weights packed for the kernel keep their dtype's name
        key = q.fmt.name if q is not None and p.dtype is torch.uint8 else str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out

