"""Quantized weight formats kept as llama.cpp stores them (Q8_0, Q4_0, Q4_1), and the kernel layout.

A GGUF row of K weights is K/32 blocks, each a float16 scale d (Q4_1: then a float16 minimum m) and its
quants: Q8_0 32 int8 (w = d*q), Q4_0 16 bytes of nibbles (w = d*(q-8)), Q4_1 the same (w = d*q + m),
byte j holding element j in its low nibble and element j+16 in its high one.

The kernel reads weights 16 rows at a time, so at load the rows are regrouped ("packed"): for each group
of 16 rows and each block, the 16 scales (then the 16 minimums), then the quants with row r's 4-byte
chunk c at byte 64*c + 4*r. One 64-byte load then holds 4 consecutive quant bytes of each of 16 rows,
what one VNNI dot-product instruction takes. Q8_0 quants are stored offset by 128 (q ^ 0x80, unsigned).
The packed tensor is [G, K/32, 16 * block bytes] uint8, G = ceil(N/16); missing rows are zeros.

A quantized weight is that uint8 tensor as the layer's parameter, with a QuantInfo in its `quant`
attribute (format, logical shape, and the zero columns a tensor-parallel shard pads its input with).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

BLOCK = 32  # weights per block, every format
GROUP = 16  # rows the kernel reads together


@dataclass(frozen=True)
class QFormat:
    """One kept block format."""

    name: str  # GGUF type name: Q8_0, Q4_0, Q4_1
    code: int  # the kernel's format number
    scale_bytes: int  # float16 d (and m) per block
    quant_bytes: int  # quant bytes per block

    @property
    def block_bytes(self) -> int:
        """Bytes per block of 32 weights."""
        return self.scale_bytes + self.quant_bytes

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales included."""
        return 8 * self.block_bytes / BLOCK


Q4_0 = QFormat("Q4_0", 0, 2, 16)
Q4_1 = QFormat("Q4_1", 1, 4, 16)
Q8_0 = QFormat("Q8_0", 2, 2, 32)
F32 = QFormat("F32", 3, 0, 4 * BLOCK)  # float weights packed for the same kernel (no blocks, no scales)
BF16 = QFormat("BF16", 4, 0, 2 * BLOCK)
FORMATS = {f.name: f for f in (Q8_0, Q4_0, Q4_1)}  # the kept quantized formats
FLOATS = {torch.float32: F32, torch.bfloat16: BF16}
QUANTIZE = {"int8": Q8_0, "int4": Q4_0, "int4-min": Q4_1}  # --quantize names -> kept format


@dataclass(frozen=True)
class QuantInfo:
    """What a packed uint8 weight holds: format, [N, K] stored, and the zero columns x is padded with.

    A tensor-parallel shard whose input columns start or end inside a block stores the whole blocks and
    pads its input with zeros there: x [.., K - left - right] -> [.., K], exact (a zero times any weight)."""

    fmt: QFormat
    n: int
    k: int  # stored columns, a multiple of 32
    pad: tuple[int, int] = (0, 0)  # (left, right) zero columns added to x


def _gguf_type(fmt: QFormat):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[fmt.name]


def quantize_rows(w: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """GGUF bytes [N, K/32 * block bytes] of w [N, K] (K % 32 == 0), by ggml's reference quantizer (gguf)."""
    from gguf.quants import quantize

    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"{fmt.name} needs rows of a multiple of {BLOCK} weights, not {k}")
    return torch.from_numpy(quantize(w.detach().float().cpu().numpy(), _gguf_type(fmt)).copy())


def dequantize_rows_reference(rows: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """float32 [N, K] of GGUF bytes [N, K/32 * block bytes], by ggml's reference dequantizer (gguf)."""
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(rows.cpu().numpy(), _gguf_type(fmt)).astype(np.float32))


def dequantize_rows(rows: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """float32 [N, K] of GGUF bytes [N, K/32 * block bytes] on their device (torch ops)."""
    n = rows.shape[0]
    b = rows.reshape(n, -1, fmt.block_bytes)  # [N, nb, bytes]
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    q = b[..., fmt.scale_bytes:]
    if fmt is Q8_0:
        w = d * q.contiguous().view(torch.int8).float()
    else:
        nib = torch.cat((q & 0x0F, q >> 4), dim=-1).float()  # [N, nb, 32]: elements 0..15 then 16..31
        w = d * (nib - 8) if fmt is Q4_0 else d * nib + b[..., 2:4].contiguous().view(torch.float16).float()
    return w.reshape(n, -1)


def pack(rows: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Kernel layout [G, nb, 16 * block bytes] of GGUF bytes [N, nb * block bytes] (see the module doc)."""
    n = rows.shape[0]
    g = -(-n // GROUP)
    b = rows.reshape(n, -1, fmt.block_bytes)
    if g * GROUP != n:
        b = torch.cat((b, b.new_zeros(g * GROUP - n, *b.shape[1:])))
    b = b.reshape(g, GROUP, -1, fmt.block_bytes).transpose(1, 2)  # [G, nb, 16, bytes]
    scales = [b[..., i:i + 2].reshape(g, -1, 2 * GROUP) for i in range(0, fmt.scale_bytes, 2)]
    q = b[..., fmt.scale_bytes:]
    if fmt is Q8_0:
        q = q ^ 0x80
    chunks = q.reshape(g, -1, GROUP, fmt.quant_bytes // 4, 4).transpose(2, 3)  # [G, nb, chunk, row, 4]
    return torch.cat([*scales, chunks.reshape(g, -1, GROUP * fmt.quant_bytes)], dim=-1).contiguous()


def unpack(packed: torch.Tensor, fmt: QFormat, n: int) -> torch.Tensor:
    """GGUF bytes [n, nb * block bytes] of a packed tensor (pack's inverse)."""
    g, nb, _ = packed.shape
    s = fmt.scale_bytes * GROUP
    scales = [packed[..., i:i + 2 * GROUP].reshape(g, nb, GROUP, 2) for i in range(0, s, 2 * GROUP)]
    q = packed[..., s:].reshape(g, nb, fmt.quant_bytes // 4, GROUP, 4).transpose(2, 3)
    q = q.reshape(g, nb, GROUP, fmt.quant_bytes)
    if fmt is Q8_0:
        q = q ^ 0x80
    b = torch.cat([*scales, q], dim=-1).transpose(1, 2)  # [G, 16, nb, bytes]
    return b.reshape(g * GROUP, -1)[:n].contiguous()


def quant_weight(rows: torch.Tensor, fmt: QFormat, k: int, pad: tuple[int, int] = (0, 0),
                 device: torch.device | str = "cpu") -> nn.Parameter:
    """The layer parameter for GGUF bytes rows [N, nb * block bytes] of K = k weights: packed, tagged."""
    if rows.shape[1] * BLOCK != k * fmt.block_bytes:
        raise ValueError(f"{fmt.name} rows of {rows.shape[1]} bytes do not hold {k} weights")
    p = nn.Parameter(pack(rows, fmt).to(device), requires_grad=False)
    p.quant = QuantInfo(fmt, rows.shape[0], k, pad)
    return p


def pack_float(w: torch.Tensor) -> torch.Tensor:
    """Kernel layout of a float32 [N, K] (-> [G, K, 16]) or bfloat16 [N, K even] (-> [G, K/2, 16, 2]) weight."""
    n, k = w.shape
    g = -(-n // GROUP)
    if g * GROUP != n:
        w = torch.cat((w, w.new_zeros(g * GROUP - n, k)))
    if w.dtype is torch.bfloat16:
        return w.reshape(g, GROUP, k // 2, 2).transpose(1, 2).contiguous()
    return w.reshape(g, GROUP, k).transpose(1, 2).contiguous()


def float_weight(w: torch.Tensor) -> nn.Parameter:
    """The layer parameter for a float32/bfloat16 weight [N, K] packed for the kernel, tagged."""
    p = nn.Parameter(pack_float(w), requires_grad=False)
    p.quant = QuantInfo(FLOATS[w.dtype], w.shape[0], w.shape[1])
    return p


def info(weight: torch.Tensor) -> QuantInfo | None:
    """The QuantInfo of a packed weight, None for a plain [N, K] one."""
    return getattr(weight, "quant", None)


@functools.cache
def _byte_index(fmt: QFormat, device: torch.device) -> torch.Tensor:
    """[16, block bytes]: where byte j of row r's GGUF block sits in its packed group's block."""
    lane = torch.arange(GROUP)
    cols = []
    for i in range(fmt.scale_bytes // 2):  # scale array i (d, then m) starts at byte 32 * i
        cols += [2 * GROUP * i + 2 * lane, 2 * GROUP * i + 2 * lane + 1]
    s = fmt.scale_bytes * GROUP
    for c in range(fmt.quant_bytes // 4):
        cols += [s + 64 * c + 4 * lane + j for j in range(4)]
    return torch.stack(cols, dim=-1).to(device)


def rows_of(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 rows ids [T] of a packed weight: [T, K]."""
    q = info(weight)
    g, lane = ids // GROUP, ids % GROUP
    if q.fmt is F32:
        return weight[g, :, lane].float()
    if q.fmt is BF16:
        return weight[g, :, lane, :].reshape(len(ids), q.k).float()
    idx = _byte_index(q.fmt, weight.device)[lane]  # [T, block bytes]: each GGUF byte's place in the group
    blocks = weight[g]  # [T, nb, 16 * block bytes]
    rows = torch.gather(blocks, 2, idx[:, None, :].expand(-1, blocks.shape[1], -1))  # [T, nb, block bytes]
    if q.fmt is Q8_0:
        rows[..., q.fmt.scale_bytes:] ^= 0x80
    return dequantize_rows(rows.reshape(len(ids), -1), q.fmt)


def dequantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] of a packed weight (K as stored, pads included)."""
    q = info(weight)
    return rows_of(weight, torch.arange(q.n, device=weight.device))
