"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2): plain single-device PyTorch."""

from __future__ import annotations

import torch
from torch import nn

from meshlm.config import ModelConfig
from meshlm.kernels import Embedding, linear_many, silu_mul
from meshlm.kernels.decode import LayerWeights
from meshlm.models.layers import AttentionBackend, Linear, RMSNorm, rope_cos_sin, rope_inv_freq


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads; head counts come from the weight shapes."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        d, bias = cfg.head_dim, cfg.attention_bias
        self.layer_id = layer_id
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * d, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias)
        self.o_proj = Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.attention_out_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend) -> torch.Tensor:
        # x [B, S, H] -> q [B, S, Hq_local*D], k/v [B, S, Hkv_local*D]: one call when decoding
        q, k, v = linear_many(x, [self.q_proj, self.k_proj, self.v_proj])
        return self.o_proj.forward(attn(self.layer_id, q, k, v, cos, sin))  # RoPE inside attn; [B, S, Hq_local*D]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_many(x, [self.gate_proj, self.up_proj])
        return self.down_proj.forward(silu_mul(gate, up))


class Block(nn.Module):
    """Pre-norm decoder layer. It returns its MLP output and the residual stream apart, and the next layer
    adds them in its first norm (one fused call): layer l's output is out + residual.

    Inside a layer, sub-modules are called through .forward, not nn.Module.__call__, whose machinery costs
    microseconds per call: at batch-1 decode six such calls per layer were about a quarter of the step's
    time outside the linear products. So module hooks fire on the Block, not on its parts."""

    def __init__(self, cfg: ModelConfig, layer_id: int, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) [B, S, H] -> (mlp out, residual); residual None: x is the whole hidden state."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            residual, h = self.input_layernorm.forward(x, residual)  # residual + x, then its norm
        a = self.self_attn.forward(h, cos, sin, attn)
        residual, h = self.post_attention_layernorm.forward(a, residual)
        return self.mlp.forward(h), residual

    def decode_weights(self) -> LayerWeights | None:
        """This layer's parameters for the whole-stack decode op (kernels/decode.py); None when its MLP is
        not the SwiGLU one (the op checks the linears themselves)."""
        a, m = self.self_attn, self.mlp
        if type(m) is not MLP:
            return None
        return LayerWeights(self.input_layernorm.weight, self.post_attention_layernorm.weight,
                            (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj))


class Transformer(nn.Module):
    """Decoder-only transformer. A pipeline stage may set embed_tokens / norm / lm_head to None."""

    block_cls = Block

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): self.make_block(cfg, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: nn.Linear | None = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)

    def make_block(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        """One decoder layer; subclasses swap the MLP."""
        return Block(cfg, layer_id)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so."""
        if self.cfg.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] (or hidden [B, S, H] on a later stage), positions [B, S] -> logits or hidden.

        logits_index [B, K] picks which positions reach the head (all of them when None).
        """
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens  # [B, S, H]
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        stack = getattr(attn, "layers_op", None)  # the backend's whole-stack op for this step, if it has one
        if stack is not None:
            h = stack(h, cos, sin)  # every layer in one call, residual added: [B, S, H]
        else:
            residual = None
            for layer in self.layers.values():
                h, residual = layer(h, residual, cos, sin, attn)
            if residual is not None:
                h = residual + h
        if self.norm is None:
            return h
        if logits_index is not None:
            h = torch.gather(h, 1, logits_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, K, H]
        h = self.norm(h)
        return self.lm_head(h) if self.lm_head is not None else h  # [B, K, V]


# Sharding plan, as data: module name pattern -> style. The parallel package applies it; this file
# knows nothing of ranks. "heads_*" styles split attention by whole KV groups (uneven allowed).
PLAN: dict[str, str] = {
    "embed_tokens": "vocab_embedding",
    "layers.*.self_attn.q_proj": "heads_colwise",
    "layers.*.self_attn.k_proj": "kv_heads_colwise",
    "layers.*.self_attn.v_proj": "kv_heads_colwise",
    "layers.*.self_attn.o_proj": "heads_rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "lm_head": "vocab_head",
}
