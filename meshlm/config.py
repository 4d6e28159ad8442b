"""Frozen configuration dataclasses, one per concern, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from meshlm.errors import ConfigError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "OlmoeForCausalLM",
)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is 'default', 'linear' or 'llama3'."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"RoPE scaling type {self.kind!r} is not supported; meshlm supports "
                "'default', 'linear' and 'llama3'. Use a checkpoint with one of these."
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> RopeConfig:
        """Read rope_theta/rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
        params = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        return cls(
            theta=theta,
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(
                params.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
            ),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer, read from a HF config.json or GGUF metadata."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias
    attention_out_bias: bool = False  # o_proj carries a bias (Llama with attention_bias; never Qwen2)
    mlp_bias: bool = False  # gate/up/down carry biases (Llama mlp_bias)
    sliding_window: int | None = None  # a query at p sees keys j with p - window < j <= p; None = all
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each routed expert's intermediate size (0: intermediate_size, as Mixtral)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert, gated by sigmoid(x @ g); 0: none
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1 (Mixtral); Qwen2-MoE/OLMoE: no
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP (intermediate_size) instead
    qk_norm: bool = False  # RMSNorm over the whole q and k projections before RoPE (OLMoE)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"Architecture {self.architecture!r} is not supported. meshlm runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}; convert the checkpoint to one of these "
                "or pick another model."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Model config field {name} must be positive, got {getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads}); the checkpoint's config.json is inconsistent."
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}.")
        if self.is_moe and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                f"({self.num_experts})."
            )

    @property
    def is_moe(self) -> bool:
        """True for sparse mixture-of-experts models."""
        return self.num_experts > 0

    @property
    def expert_inter(self) -> int:
        """Intermediate size of one routed expert."""
        return self.moe_intermediate_size or self.intermediate_size

    def is_sparse(self, layer: int) -> bool:
        """True when layer `layer` has a routed MoE MLP."""
        return self.is_moe and layer not in self.dense_layers

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = h * self.num_heads * self.head_dim
        kv = 2 * h * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * h
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        bias += h if self.attention_out_bias else 0
        bias += 2 * i + h if self.mlp_bias else 0
        dense = 3 * h * i
        sparse = (3 * h * self.expert_inter * self.num_experts + h * self.num_experts
                  + (3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0))
        norms = 2 * h + ((self.num_heads + self.num_kv_heads) * self.head_dim if self.qk_norm else 0)
        mlps = sum(sparse if self.is_sparse(layer) else dense for layer in range(self.num_layers))
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (q + kv + o + bias + norms) + mlps + emb + h

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(d.get("model_type", ""))
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            head_dim = d.get("head_dim") or hidden // heads
            qkv_bias, out_bias, mlp_bias = _biases(arch, d)
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope=RopeConfig.from_hf(d),
                max_position=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=qkv_bias,
                attention_out_bias=out_bias,
                mlp_bias=mlp_bias,
                sliding_window=_sliding_window(arch, d),
                **_moe_fields(arch, d),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                name=str(d.get("_name_or_path", "")),
            )
        except KeyError as e:
            raise ConfigError(
                f"config.json lacks the field {e.args[0]!r}; it is not a decoder-only transformer "
                "config meshlm can read. Point --model at a Hugging Face Llama/Mistral/Qwen2/Mixtral folder."
            ) from None


def _moe_fields(arch: str, d: dict[str, Any]) -> dict[str, Any]:
    """Routed and shared expert sizes, routing normalization and dense layers, as transformers reads them."""
    experts = int(d.get("num_local_experts") or d.get("num_experts") or 0)
    if experts == 0 or arch not in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM"):
        return {}
    out: dict[str, Any] = {"num_experts": experts, "num_experts_per_tok": int(d.get("num_experts_per_tok") or 0)}
    if arch == "Qwen2MoeForCausalLM":
        step, only = int(d.get("decoder_sparse_step") or 1), set(d.get("mlp_only_layers") or [])
        out.update(moe_intermediate_size=int(d["moe_intermediate_size"]),
                   shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                   norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   dense_layers=tuple(i for i in range(int(d["num_hidden_layers"]))
                                      if i in only or (i + 1) % step))
    if arch == "OlmoeForCausalLM":
        if d.get("clip_qkv") is not None:
            raise ConfigError("This OLMoE checkpoint clips q/k/v (clip_qkv), which meshlm does not do; use a "
                              "checkpoint with clip_qkv: null.")
        out.update(norm_topk_prob=bool(d.get("norm_topk_prob", False)), qk_norm=True)
    return out


def _biases(arch: str, d: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(q/k/v, o_proj, MLP) biases exactly as transformers builds each architecture."""
    if arch == "Qwen2ForCausalLM":
        return True, False, False  # Qwen2Attention hard-codes bias=True on q/k/v only
    if arch == "Qwen2MoeForCausalLM":
        return bool(d.get("qkv_bias", True)), False, False
    if arch == "OlmoeForCausalLM":
        attn = bool(d.get("attention_bias", False))
        return attn, attn, False
    if arch == "LlamaForCausalLM":
        attn = bool(d.get("attention_bias", False))  # LlamaAttention: q, k, v and o alike
        return attn, attn, bool(d.get("mlp_bias", False))
    return False, False, False  # Mistral, Mixtral: never any bias, whatever the config says


def _sliding_window(arch: str, d: dict[str, Any]) -> int | None:
    """The attention window of Mistral/Mixtral (every layer); None when attention is global."""
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return int(d["sliding_window"]) if d.get("sliding_window") else None
    if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        per_layer = d.get("layer_types") or []
        window_layers = d.get("use_sliding_window") and d.get("sliding_window") and (
            int(d.get("max_window_layers", 0)) < int(d["num_hidden_layers"]))
        if "sliding_attention" in per_layer or window_layers:
            raise ConfigError(
                "This Qwen2 checkpoint uses sliding-window attention on some layers (use_sliding_window: "
                "true), which meshlm does not support; use a checkpoint with use_sliding_window: false."
            )
    return None


def _arch_from_model_type(model_type: str) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen2_moe": "Qwen2MoeForCausalLM",
        "olmoe": "OlmoeForCausalLM",
    }.get(model_type, model_type or "<missing>")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: greedy when temperature == 0."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # also return this many top alternatives (0..20) per token

    def __post_init__(self) -> None:
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ConfigError(f"logprobs must be between 0 and 20, got {self.logprobs}; ask for 20 or fewer.")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}; pass 1 or more.")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise ConfigError(
                f"temperature must be >= 0, got {self.temperature!r}; use 0 for greedy decoding."
            )
        if not (0.0 < self.top_p <= 1.0) or math.isnan(self.top_p):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}; use 1.0 to disable nucleus sampling.")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}; use 0 to disable top-k.")
        if any(s == "" for s in self.stop):
            raise ConfigError("stop strings must be non-empty; remove the empty string from stop.")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1
