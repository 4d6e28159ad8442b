"""Token embedding over a float table or a packed quantized one (qformat.py), one call for both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.kernels import quant


def embedding(ids: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` [...] of weight [V, H] -> [..., H]: F.embedding, or a packed table's rows dequantized to dtype."""
    if weight.dtype is torch.uint8:
        return quant.embedding(ids, weight, dtype)
    return F.embedding(ids, weight)


class Embedding(nn.Embedding):
    """nn.Embedding whose table may be packed quantized; its rows then come out in out_dtype."""

    quantizable = True  # the loader may assign a packed weight
    out_dtype: torch.dtype = torch.float32  # set by the loader to the compute dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight, self.out_dtype)
