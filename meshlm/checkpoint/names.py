"""Map meshlm parameter names to Hugging Face checkpoint tensor names."""

from __future__ import annotations

import re
from collections.abc import Sequence

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(w[123])$")
# Qwen2-MoE and OLMoE name each expert's projections as a dense MLP does; Mixtral as w1 (gate), w3 (up), w2 (down).
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def hf_names(name: str, architecture: str = "", experts: Sequence[int] = ()) -> list[str]:
    """Checkpoint tensors that make up meshlm parameter `name`: for stacked experts, one per id in `experts`."""
    m = _EXPERT.match(name)
    if m:
        layer, w = m.groups()
        if architecture == "MixtralForCausalLM":
            return [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for e in experts]
        return [f"model.layers.{layer}.mlp.experts.{e}.{_PROJ[w]}.weight" for e in experts]
    if name.startswith("lm_head."):
        return [name]
    router = ".block_sparse_moe.gate." if architecture == "MixtralForCausalLM" else ".mlp.gate."
    return ["model." + name.replace(".mlp.router.", router)]
