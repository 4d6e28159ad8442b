"""Build a model on the meta device and assign checkpoint tensors: peak memory ~ one copy."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from meshlm.checkpoint.names import hf_names
from meshlm.checkpoint.quantized import Conversions, Precision, load_quantized
from meshlm.checkpoint.source import ExpertPick, Slice, TensorSource
from meshlm.config import ModelConfig
from meshlm.errors import CheckpointError
from meshlm.kernels.gemv import Embedding, Linear
from meshlm.kernels.qformat import info
from meshlm.models.registry import model_class

log = logging.getLogger(__name__)



# (meshlm parameter name, full checkpoint shape) -> the slice this process owns, or None for all of it.
PartFn = Callable[[str, tuple[int, ...]], "Slice | ExpertPick | None"]


def build_meta(cfg: ModelConfig) -> nn.Module:
    """The model with every parameter on the meta device (no memory)."""
    with torch.device("meta"):
        return model_class(cfg)(cfg)


def load_weights(model: nn.Module, cfg: ModelConfig, source: TensorSource, dtype: torch.dtype | Precision,
                 part_for: PartFn | None = None, progress: bool = False,
                 device: torch.device | str = "cpu", conversions: Conversions | None = None) -> nn.Module:
    """Assign every parameter of `model` (on meta) from `source`, reading only the owned slices.

    dtype: float weights in that dtype, or a Precision: the weights of kernels.Linear / kernels.Embedding
    layers may load quantized (a GGUF's own blocks, or --quantize)."""
    prec = dtype if isinstance(dtype, Precision) else Precision(dtype, keep=False)
    conversions = conversions if conversions is not None else Conversions()
    available = set(source.names())
    params = [(n, p) for n, p in model.named_parameters() if not _tied_head(model, cfg, n)]
    bar = tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for name, _ in bar:
        # A tied head without the embedding beside it (the last pipeline stage) reads the embedding matrix.
        sources = hf_names("embed_tokens.weight" if _tied(cfg, name) else name, cfg.architecture,
                           range(cfg.num_experts))
        missing = [s for s in sources if s not in available]
        if missing:
            raise CheckpointError(
                f"The checkpoint lacks tensor {missing[0]!r} (needed for {name}). It is incomplete or "
                f"was saved for another architecture than {cfg.architecture}."
            )
        full = source.shape(sources[0])
        part = part_for(name, full) if part_for else None
        if isinstance(part, ExpertPick):  # expert parallelism: only this rank's experts, in its slot order
            sources, part = [sources[e] for e in part.ids], part.part
        if len(sources) == 1 and _quantizable(model, name):
            packed = load_quantized(source, sources[0], part, prec, device, conversions)
            if packed is not None:
                _assign(model, name, packed, prec.dtype)
                continue
        tensors = [source.read(s, part) for s in sources]
        t = tensors[0] if len(tensors) == 1 else torch.stack(tensors)
        _assign(model, name, t.to(device=device, dtype=prec.dtype), prec.dtype)
    # Buffers computed at init (rotary frequencies) were built on meta: rebuild them on the device.
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            from meshlm.models.layers import rope_inv_freq

            mod.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model


def _tied(cfg: ModelConfig, name: str) -> bool:
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def _tied_head(model: nn.Module, cfg: ModelConfig, name: str) -> bool:
    """A tied head that tie_weights() will share from the embedding (so it is not read)."""
    return _tied(cfg, name) and getattr(model, "embed_tokens", None) is not None


def _quantizable(model: nn.Module, name: str) -> bool:
    """Whether `name` is the weight of a layer whose forward takes a packed weight (kernels.Linear and
    kernels.Embedding, their parallel subclasses included); a MoE router stays float, as llama.cpp keeps it."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return attr == "weight" and isinstance(owner, (Linear, Embedding)) and not owner_name.endswith(".router")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
    owner._parameters[attr] = param  # a packed one keeps its .quant (qformat.quant_weight)
    if attr != "weight" or not isinstance(owner, (nn.Linear, nn.Embedding)):
        return
    q = info(param)
    rows, cols = (q.n, q.k - sum(q.pad)) if q is not None else param.shape  # the logical [N, K] this rank holds
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = rows, cols
    else:
        owner.num_embeddings, owner.embedding_dim = rows, cols
        owner.out_dtype = dtype  # a packed table's rows come out in the compute dtype
