"""Sparse mixture-of-experts decoders (Mixtral, Qwen2-MoE, OLMoE): a router apart from stacked experts.

The router decides (top-k of a softmax, renormalized or not); `Experts` runs the chosen experts. The
parallel package swaps `Experts` for an expert-parallel class that moves tokens to the ranks holding their
experts, so routing stays here, single-device, and is computed identically on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.config import ModelConfig
from meshlm.models.layers import AttentionBackend, Linear
from meshlm.models.llama import MLP, Attention, Block, Transformer
from meshlm.models.llama import PLAN as DENSE_PLAN


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x [n, H], w1/w3 [I, H], w2 [H, I] -> [n, H]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1/w3 [E, I, H] (gate/up), w2 [E, H, I] (down)."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids/weights [N, K] -> [N, H]; only experts that got tokens run, in ascending order."""
        out = torch.zeros_like(x)
        for e in torch.unique(expert_ids).tolist():
            tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            ye = expert_ffn(x[tok], self.w1[e], self.w3[e], self.w2[e])  # [n_e, H]
            out.index_add_(0, tok, ye * weights[tok, slot, None].to(ye.dtype))
        return out


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, K] fp32, expert ids [N, K]): top-k of the softmax."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """Top-k routed experts, plus Qwen2-MoE's shared expert scaled by sigmoid(x @ shared_expert_gate)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_inter)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size) \
            if cfg.shared_expert_intermediate_size else None
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False) if self.shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        weights, ids = route(self.router.forward(x), self.top_k, self.renormalize)  # [N, K]
        out = self.experts.forward(x, ids, weights.to(x.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate.forward(x)) * self.shared_expert.forward(x)
        return out.view(shape)


class QKNormAttention(Attention):
    """OLMoE attention: RMSNorm over the whole q and k projections (all heads at once) before RoPE."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        from meshlm.models.layers import RMSNorm

        super().__init__(cfg, layer_id)
        self.q_norm = RMSNorm(cfg.num_heads * cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.num_kv_heads * cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        q = self.q_norm.forward(self.q_proj.forward(x))  # [B, S, Hq_local*D]
        k = self.k_norm.forward(self.k_proj.forward(x))  # [B, S, Hkv_local*D]
        return self.o_proj.forward(attn(self.layer_id, q, k, self.v_proj.forward(x), cos, sin))


class MixtralTransformer(Transformer):
    """Llama decoder whose MLP is a sparse MoE (dense on cfg.dense_layers); q/k norms when cfg.qk_norm."""

    def make_block(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        block = Block(cfg, layer_id, mlp=SparseMoE(cfg) if cfg.is_sparse(layer_id) else None)
        if cfg.qk_norm:
            block.self_attn = QKNormAttention(cfg, layer_id)
        return block


PLAN: dict[str, str] = {
    **DENSE_PLAN,  # dense layers of Qwen2-MoE keep the dense MLP's styles
    "layers.*.self_attn.q_norm": "heads_norm",
    "layers.*.self_attn.k_norm": "kv_heads_norm",
    "layers.*.mlp.router": "replicate",
    "layers.*.mlp.experts": "expert",
    "layers.*.mlp.shared_expert.gate_proj": "shared_colwise",
    "layers.*.mlp.shared_expert.up_proj": "shared_colwise",
    "layers.*.mlp.shared_expert.down_proj": "shared_rowwise",
    "layers.*.mlp.shared_expert_gate": "replicate",
}
