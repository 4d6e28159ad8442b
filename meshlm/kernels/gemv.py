"""Linear layers and embeddings over packed weights, and the CPU kernels' build.

On a CPU with AVX-512 every Linear weight is packed at load (qformat.py: float32, bfloat16, or a kept
quantized format) and every product, decode or prefill, runs the kernel in quant.cpp: the weights stream
once per call at the memory bandwidth, and a row's result never depends on the rows around it. Elsewhere
(CUDA, other CPUs) float weights stay [N, K] for F.linear and quantized ones dequantize per call. fused.cpp
holds the layer's elementwise chains (RMSNorm, RoPE) as one call each (meshlm/kernels/fused.py). Every op
falls back to plain PyTorch when the extension cannot be built.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.kernels.build import load_extension
from meshlm.kernels.pages import to_huge_pages
from meshlm.kernels.quant import call_args, embedding, qlinear, qlinear_many

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(n) for n in ("fused.cpp", "quant.cpp", "decode.cpp")]
# -ffp-contract=off: a * b + c stays two roundings, as in the reference's separate ops
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-ffp-contract=off"]
_op = None  # torch.ops.meshlm_kernels once loaded
_tried = False


def enabled() -> bool:
    """Whether the kernels are wanted: on unless $MESHLM_KERNELS=0."""
    return os.environ.get("MESHLM_KERNELS", "1") != "0"


@functools.cache
def vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (int8 dot products), which the quantized formats need."""
    try:
        return " avx512_vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def _build():
    """Compile (or reuse from the torch extensions cache) and register the ops; None when unavailable."""
    if not enabled():
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16"):
        log.info("meshlm.kernels: no AVX-512 on this CPU; linear layers use F.linear")
        return None
    load_extension("meshlm_kernels_", _SOURCES, _CFLAGS, "CPU kernels")
    return torch.ops.meshlm_kernels


def kernel():
    """The loaded ops (torch.ops.meshlm_kernels), building them on the first call; None (logged once)
    when they cannot be had."""
    global _op, _tried
    if not _tried:
        _tried = True
        try:
            _op = _build()
        except Exception as e:  # a missing compiler or headers must not stop generation
            log.warning("meshlm.kernels: CPU kernels unavailable (%s); plain PyTorch ops are used",
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            _op = None
    return _op


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias: the packed-weight kernel for a packed weight, F.linear for a plain one."""
    if hasattr(weight, "quant"):
        return qlinear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_many(x: torch.Tensor, layers: list[nn.Linear]) -> list[torch.Tensor]:
    """[layer(x) for layer in layers]; packed plain Linear layers in one kernel call (x is read, widened
    or quantized once, and one parallel region covers every weight). The call's arguments are worked out
    once and kept on the first layer (a decode step makes two such calls per layer)."""
    first = layers[0]
    kept = first.__dict__.get("_many")
    if kept is None or kept[0] is not first._parameters["weight"] or len(kept[1]) != len(layers):
        ws = [m.weight for m in layers]
        packed = all(type(m) is Linear and hasattr(m.weight, "quant") for m in layers)
        kept = (ws[0], ws, [m.bias for m in layers], call_args(ws) if packed else None, packed)
        first.__dict__["_many"] = kept
    if kept[4]:
        return qlinear_many(x, kept[1], kept[2], kept[3])
    return [m(x) for m in layers]


def embed(ids: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ids [...] of an embedding table, plain or packed: [..., H] (dtype: a packed table's output)."""
    if hasattr(weight, "quant"):
        return embedding(ids, weight, dtype or (weight.dtype if weight.is_floating_point() else torch.float32))
    return F.embedding(ids, weight)


class Linear(nn.Linear):
    """nn.Linear whose weight may be packed for the CPU kernel (qformat.py); same parameters otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding whose table may be packed (shared with a tied head, or quantized)."""

    out_dtype: torch.dtype | None = None  # a quantized table's output dtype (the model's compute dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embed(ids, self.weight, self.out_dtype)


def pack_linears(model: nn.Module) -> int:
    """Pack every float32/bfloat16 kernels.Linear weight of a CPU model for the kernel, in place; a tied embedding
    gets the head's packed table. Then every packed weight (these and quantized ones) moves onto 2 MB pages
    in module order (pages.py). No-op (0) where the kernel is unavailable; returns the count packed."""
    from meshlm.kernels.qformat import FLOATS, float_weight

    if kernel() is None:
        return 0
    packed: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        w = mod.weight if isinstance(mod, Linear) else None  # Linear and its parallel subclasses dispatch
        if (w is not None and not hasattr(w, "quant") and w.device.type == "cpu" and w.dtype in FLOATS
                and w.dim() == 2 and (w.dtype is torch.float32 or w.shape[1] % 2 == 0)):
            packed.setdefault(id(w), float_weight(w.data))
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and id(mod.weight) in packed:
            mod.weight = packed[id(mod.weight)]
    kept = {id(m.weight): m.weight for m in model.modules()  # every packed weight, quantized ones too
            if isinstance(m, (nn.Linear, nn.Embedding)) and hasattr(m.weight, "quant")}
    to_huge_pages(list(kept.values()))
    return len(packed)
