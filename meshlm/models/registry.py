"""Hugging Face architecture name -> model class and sharding plan."""

from __future__ import annotations

from torch import nn

from meshlm.config import ModelConfig
from meshlm.models import llama, mixtral

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, str]]] = {
    "LlamaForCausalLM": (llama.Transformer, llama.PLAN),
    "MistralForCausalLM": (llama.Transformer, llama.PLAN),
    "Qwen2ForCausalLM": (llama.Transformer, llama.PLAN),
    "MixtralForCausalLM": (mixtral.MixtralTransformer, mixtral.PLAN),
    "Qwen2MoeForCausalLM": (mixtral.MixtralTransformer, mixtral.PLAN),
    "OlmoeForCausalLM": (mixtral.MixtralTransformer, mixtral.PLAN),
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The nn.Module class that implements cfg.architecture."""
    return _REGISTRY[cfg.architecture][0]


def sharding_plan(cfg: ModelConfig) -> dict[str, str]:
    """Module-name pattern -> sharding style for cfg.architecture."""
    return dict(_REGISTRY[cfg.architecture][1])
