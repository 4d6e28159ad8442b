"""Mixtral-style sparse mixture-of-experts decoder: a router apart from stacked experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.config import ModelConfig
from meshlm.models.layers import Linear
from meshlm.models.llama import PLAN as DENSE_PLAN
from meshlm.models.llama import Block, Transformer


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1/w3 [E, I, H] (gate/up), w2 [E, H, I] (down)."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids/weights [N, K] -> [N, H]; only experts that got tokens run."""
        out = torch.zeros_like(x)
        flat = expert_ids.flatten()  # [N*K]
        for e in torch.unique(flat).tolist():
            tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            xe = x[tok]  # [n_e, H]
            ye = F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e])
            out.index_add_(0, tok, ye * weights[tok, slot, None].to(ye.dtype))
        return out


class SparseMoE(nn.Module):
    """Top-k routing with softmax weights renormalized over the chosen experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)  # [N, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, ids, weights.to(x.dtype)).view(shape)


class MixtralTransformer(Transformer):
    """Llama decoder whose MLP is a sparse MoE."""

    def make_block(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return Block(cfg, layer_id, mlp=SparseMoE(cfg))


PLAN: dict[str, str] = {
    **{k: v for k, v in DENSE_PLAN.items() if ".mlp." not in k},
    "layers.*.mlp.router": "replicate",
    "layers.*.mlp.experts": "expert",
}
