"""ModelConfig.from_hf for transformers-4 and -5 config dicts; RoPE frequencies against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from meshlm.config import ModelConfig, RopeConfig
from meshlm.errors import ConfigError
from meshlm.models.layers import rope_inv_freq

BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
LLAMA3_ROPE = RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position=8192)


def test_transformers4_style_rope_theta_and_rope_scaling():
    cfg = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING})
    assert cfg.rope == LLAMA3_ROPE
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size) == (32, 8, 128, 4)
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.bos_token_id == 128000
    assert not cfg.attention_bias and not cfg.is_moe and not cfg.tie_word_embeddings


def test_transformers5_style_rope_parameters():
    cfg = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_SCALING}})
    assert cfg.rope == LLAMA3_ROPE


def test_legacy_type_key_and_defaults():
    old = {**BASE, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    rope = ModelConfig.from_hf(old).rope
    assert (rope.kind, rope.factor, rope.theta) == ("linear", 2.0, 1e4)
    assert ModelConfig.from_hf(BASE).rope == RopeConfig(theta=10000.0, original_max_position=131072)
    null = ModelConfig.from_hf({**BASE, "rope_theta": 1e6, "rope_scaling": None})
    assert null.rope == RopeConfig(theta=1e6, original_max_position=131072)


@pytest.mark.parametrize("hf_cfg", [
    LlamaConfig(vocab_size=100, hidden_size=144, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=9, num_key_value_heads=3, head_dim=16, eos_token_id=7,
                rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING}),
    Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6),
    MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2),
], ids=["llama", "qwen2", "mixtral"])
def test_from_real_transformers_config(hf_cfg):
    """The dict transformers itself writes (to_dict, as in config.json) reads back field for field."""
    d = {**hf_cfg.to_dict(), "architectures": None}  # exercise the model_type fallback
    cfg = ModelConfig.from_hf(d)
    heads = hf_cfg.num_attention_heads
    assert cfg.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                "mixtral": "MixtralForCausalLM"}[hf_cfg.model_type]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        hf_cfg.vocab_size, hf_cfg.hidden_size, hf_cfg.intermediate_size, hf_cfg.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads) == (heads, hf_cfg.num_key_value_heads)
    assert cfg.head_dim == (getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads)
    assert cfg.rms_norm_eps == hf_cfg.rms_norm_eps
    assert cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.rope.theta == hf_cfg.rope_parameters["rope_theta"]
    assert cfg.rope.kind == hf_cfg.rope_parameters["rope_type"]
    assert cfg.attention_bias == (hf_cfg.model_type == "qwen2")  # Qwen2 always has q/k/v bias
    assert cfg.num_experts == getattr(hf_cfg, "num_local_experts", 0)
    assert cfg.num_experts_per_tok == (getattr(hf_cfg, "num_experts_per_tok", 0) if cfg.is_moe else 0)


def _hf_llama(rope_parameters: dict, head_dim: int = 64) -> LlamaConfig:
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=131072, rope_parameters=rope_parameters)


@pytest.mark.parametrize("rope_parameters", [
    {**LLAMA3_SCALING, "rope_theta": 500000.0},
    {**LLAMA3_SCALING, "rope_theta": 10000.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 2.0,
     "high_freq_factor": 8.0, "original_max_position_embeddings": 4096},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "default", "rope_theta": 1e6},
], ids=["llama3.1", "llama3-short-context", "llama3-other-factors", "linear", "default"])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope_inv_freq_matches_transformers(rope_parameters, head_dim):
    hf_cfg = _hf_llama(rope_parameters, head_dim)
    kind = rope_parameters["rope_type"]
    # transformers 5 keeps the unscaled default outside ROPE_INIT_FUNCTIONS, on the rotary module
    default = LlamaRotaryEmbedding.compute_default_rope_parameters
    init = default if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    expected, attention_scaling = init(hf_cfg, device="cpu")
    assert attention_scaling == 1.0  # meshlm has no cos/sin post-scaling; these types never need it
    ours = rope_inv_freq(ModelConfig.from_hf(hf_cfg.to_dict()).rope, head_dim)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    if rope_parameters["rope_type"] != "default":  # scaling must change something, or the case is idle
        plain = rope_inv_freq(RopeConfig(theta=rope_parameters["rope_theta"]), head_dim)
        assert not torch.allclose(ours, plain)


def test_inconsistent_heads_are_refused():
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf({**BASE, "num_key_value_heads": 5})


def test_bad_experts_per_token_is_refused():
    d = {**BASE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 5}
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_hf(d)


@pytest.mark.parametrize("arch,extra,expected", [
    ("LlamaForCausalLM", {}, (False, False, False)),
    ("LlamaForCausalLM", {"attention_bias": True}, (True, True, False)),  # q, k, v and o
    ("LlamaForCausalLM", {"mlp_bias": True}, (False, False, True)),
    ("Qwen2ForCausalLM", {}, (True, False, False)),
    ("Qwen2ForCausalLM", {"attention_bias": False}, (True, False, False)),  # transformers hard-codes it
    ("MistralForCausalLM", {"attention_bias": True, "mlp_bias": True}, (False, False, False)),
    ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}, (False, False, False)),
])
def test_biases_follow_transformers(arch, extra, expected):
    cfg = ModelConfig.from_hf({**BASE, "architectures": [arch], **extra})
    assert (cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias) == expected


@pytest.mark.parametrize("arch,extra,window", [
    ("MistralForCausalLM", {"sliding_window": 4096}, 4096),
    ("MistralForCausalLM", {"sliding_window": None}, None),
    ("MixtralForCausalLM", {"sliding_window": 4096, "num_local_experts": 4, "num_experts_per_tok": 2}, 4096),
    ("Qwen2ForCausalLM", {"sliding_window": 32768, "use_sliding_window": False}, None),
    ("LlamaForCausalLM", {"sliding_window": 16}, None),
])
def test_sliding_window(arch, extra, window):
    assert ModelConfig.from_hf({**BASE, "architectures": [arch], **extra}).sliding_window == window


def test_qwen2_sliding_layers_are_refused():
    d = {**BASE, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 4096,
         "max_window_layers": 28}
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_hf(d)
    assert ModelConfig.from_hf({**d, "max_window_layers": 32}).sliding_window is None  # no layer slides


def test_generation_config_eos_ids_stop_generation(checkpoint, tmp_path):
    """generation_config.json's eos ids (Llama 3 lists its end-of-turn token only there) stop generation."""
    from transformers import GenerationConfig

    from meshlm import LLM, SamplingParams
    from meshlm.checkpoint import open_checkpoint

    src = checkpoint("llama_gqa")
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    prompt = [3, 17, 29, 41]
    with LLM(str(tmp_path), progress=False) as llm:
        free = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    base = open_checkpoint(tmp_path).cfg.eos_token_ids
    stop_at = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i] and t not in base)
    assert not set(free[:stop_at + 1]) & set(base), "the random model emitted config.json's eos; pick a prompt"
    GenerationConfig(eos_token_id=[free[stop_at]]).save_pretrained(tmp_path)
    cfg = open_checkpoint(tmp_path).cfg
    assert cfg.eos_token_ids[-1] == free[stop_at] and len(cfg.eos_token_ids) >= 2  # config.json's kept
    with LLM(str(tmp_path), progress=False) as llm:
        out = llm.generate([prompt], SamplingParams(max_tokens=12))[0]
    assert out.token_ids == free[:stop_at + 1] and out.finish_reason == "stop"
