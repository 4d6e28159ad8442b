"""Map meshlm parameter names to Hugging Face checkpoint tensor names."""

from __future__ import annotations

import re

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(w[123])$")


def hf_names(name: str, num_experts: int = 0) -> list[str]:
    """Checkpoint tensors that make up meshlm parameter `name` (several for stacked experts)."""
    m = _EXPERT.match(name)
    if m:
        layer, w = m.groups()
        return [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(num_experts)]
    if name.startswith("lm_head."):
        return [name]
    name = name.replace(".mlp.router.", ".block_sparse_moe.gate.")
    return ["model." + name]
