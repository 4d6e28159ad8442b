"""Planner memory arithmetic against hand calculations for published models (config.json written here)."""

from __future__ import annotations

import pytest

from meshlm.config import ModelConfig
from meshlm.plan import cluster as clusters
from meshlm.plan.layout import Layout, Workload, largest_share, rank_shares
from meshlm.plan.memory import check

# The published config.json fields the planner reads (meta-llama/Meta-Llama-3-8B, -70B, Llama-3.1-405B).
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}
LLAMA3_405B = {**LLAMA3_8B, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
               "num_attention_heads": 128, "max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
SERVING = Workload(prompt_tokens=2048, output_tokens=512, batch=16)  # 16 requests of 2,560 tokens in flight
H100 = clusters.resolve("8xH100")
USABLE = 0.9 * 80 * 2**30  # memory_utilization x 80 GiB


def cfg(d: dict) -> ModelConfig:
    """ModelConfig of a config.json dict."""
    return ModelConfig.from_hf(d)


def test_parameter_counts_match_the_published_sizes():
    """8.03 B, 70.55 B and 405.85 B parameters, as the model cards say."""
    assert cfg(LLAMA3_8B).num_params() == 8_030_261_248
    assert cfg(LLAMA3_70B).num_params() == 70_553_706_496
    assert round(cfg(LLAMA3_405B).num_params() / 1e9, 1) == 405.9


def test_llama3_70b_bf16_fits_8x80gb_at_tp8():
    """Per rank: 8 q heads, 1 KV head, 3,584 MLP columns, 16,032 vocabulary rows; 2 bytes each."""
    h, layers, d = 8192, 80, 128
    layer = h * 8 * d * 2 + h * 1 * d * 2 + 3 * h * 3584 + 2 * h  # q+o, k+v, gate/up/down, two norms
    weights = (layers * layer + 2 * 16032 * h + h) * 2  # + embedding and head rows + final norm
    rep = check(cfg(LLAMA3_70B), Layout(tp=8), H100, SERVING, "bfloat16")
    assert rep.weights == weights == pytest.approx(17.64e9, rel=1e-3)
    assert rep.kv_per_token == 2 * layers * 1 * d * 2 == 40960  # K and V, one KV head per rank
    assert rep.ok and rep.margin > 0.5
    assert rep.kv_tokens == int((USABLE - weights - rep.activations - rep.reserved) // 40960)
    assert rep.kv_tokens > SERVING.batch * SERVING.context


def test_llama3_70b_bf16_does_not_fit_two_gpus():
    """tp=2: 70.56 GB of weights leave ~3.7 GB of an 80 GB GPU: 8 of the 16 sequences, and the fix says so."""
    rep = check(cfg(LLAMA3_70B), Layout(tp=2), H100, SERVING, "bfloat16")
    assert rep.weights == pytest.approx(cfg(LLAMA3_70B).num_params() * 2 / 2, rel=2e-3)
    assert rep.kv_per_token == 2 * 80 * 4 * 128 * 2  # 4 KV heads per rank
    assert not rep.ok
    assert rep.max_batch == 8 and "lower the batch to 8, or add ranks" in rep.reason
    assert "40,960 tokens" in rep.reason  # 16 x 2,560
    one_device = check(cfg(LLAMA3_70B), Layout(tp=1), H100, SERVING, "bfloat16")
    assert not one_device.ok and "141.1 GB of weights" in one_device.reason
    assert "raise tp" in one_device.reason


def test_llama3_405b_bf16_needs_two_nodes():
    """811.7 GB of weights: over 8 x 77.3 GB usable; 2 x 8 GPUs at pp=2 x tp=8 hold ~50.7 GB each."""
    model = cfg(LLAMA3_405B)
    assert model.num_params() * 2 > 8 * USABLE
    for lay in (Layout(tp=8), Layout(pp=8), Layout(pp=2, tp=4)):
        assert not check(model, lay, H100, SERVING, "bfloat16").ok
    rep = check(model, Layout(pp=2, tp=8), clusters.resolve("2x8xH100"), SERVING, "bfloat16")
    assert rep.ok and rep.weights == pytest.approx(model.num_params() * 2 / 16, rel=0.02)


def test_uneven_heads_size_the_largest_rank():
    """9 heads / 3 KV heads at tp=2 split 6 + 3 (2 + 1 KV heads): memory is sized for the rank with 6."""
    odd = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 144,
                               "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 9,
                               "num_key_value_heads": 3, "head_dim": 16, "vocab_size": 512})
    shares = rank_shares(odd, Layout(tp=2), "float32")
    assert [(s.q_heads, s.kv_heads) for s in shares] == [(6, 2), (3, 1)]
    big = largest_share(odd, Layout(tp=2), "float32")
    assert big.tp_index == 0
    layer = 2 * 144 * 6 * 16 + 2 * 144 * 2 * 16 + 3 * 144 * 96 + 2 * 144
    assert big.params == 2 * layer + 2 * 256 * 144 + 144
    rep = check(odd, Layout(tp=2), clusters.resolve("cpu-host"), Workload(), "float32")
    assert rep.weights == big.params * 4 and rep.kv_per_token == 2 * 2 * 2 * 16 * 4


def test_kv_heads_replicate_when_tp_exceeds_them():
    """Llama-3-70B at tp=16 (8 KV heads): each rank keeps one KV head and 4 query heads."""
    shares = rank_shares(cfg(LLAMA3_70B), Layout(tp=16), "bfloat16")
    assert {(s.q_heads, s.kv_heads) for s in shares} == {(4, 1)}


def test_pipeline_stages_split_weights_and_kv():
    """pp=2: each stage holds its own layers' KV; the embedding on stage 0, the head on stage 1."""
    shares = rank_shares(cfg(LLAMA3_8B), Layout(pp=2), "bfloat16")
    assert sum(s.layers for s in shares) == 32
    assert sum(s.params for s in shares) == cfg(LLAMA3_8B).num_params()
    assert shares[0].head_params == 0 and shares[1].head_params == 128256 * 4096


def test_shared_host_memory_is_divided_among_ranks():
    """On a CPU host the ranks share its memory: tp=2 gives each half of what tp=1 has."""
    host = clusters.resolve("cpu-host")
    small = cfg({**LLAMA3_8B, "num_hidden_layers": 2, "vocab_size": 1024})
    one = check(small, Layout(tp=1), host, Workload(), "float32")
    two = check(small, Layout(tp=2), host, Workload(), "float32")
    assert two.usable == pytest.approx(one.usable / 2)


def test_a_fixed_kv_pool_is_checked_against_the_longest_request():
    """A KV pool too small for one request fails and names --kv-cache-mb."""
    rep = check(cfg(LLAMA3_8B), Layout(tp=1), H100, Workload(prompt_tokens=8000, output_tokens=100),
                "bfloat16", kv_budget=64 * 2**20)
    assert not rep.ok and "--kv-cache-mb" in rep.reason and rep.per_seq == 8100
