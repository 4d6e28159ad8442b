"""The upcycled SmolLM2 MoE (meshlm.upcycle): identical experts reproduce the dense model's logits; noisy experts
stay close to it (a MoE that speaks)."""

from __future__ import annotations

import pytest

from meshlm import LLM
from meshlm.upcycle import upcycle

pytestmark = pytest.mark.slow  # writes and loads a 1.4 GB float32 folder


def test_identical_experts_reproduce_the_dense_logits(tmp_path, smollm2):
    """4 experts, top-2, noise 0: every token's MoE output is w1 MLP(x) + w2 MLP(x) with w1 + w2 = 1."""
    tok = smollm2.tokenizer
    prompts = [tok.encode("Once upon a time"), tok.encode("The three laws of robotics are")]
    dense = smollm2.logits(prompts)
    path = upcycle(tmp_path / "moe", experts=4, top_k=2, noise=0.0, dtype="float32")
    with LLM(str(path), dtype="float32", progress=False) as moe:
        assert (moe.cfg.architecture, moe.cfg.num_experts, moe.cfg.num_experts_per_tok) == ("MixtralForCausalLM", 4, 2)
        same = moe.logits(prompts)
    for i, p in enumerate(prompts):
        assert (same[i, : len(p)] - dense[i, : len(p)]).abs().max() < 2e-3  # logits span ~30
    noisy = upcycle(tmp_path / "noisy", experts=4, top_k=2, noise=0.01, dtype="float32", seed=1)
    with LLM(str(noisy), dtype="float32", progress=False) as moe:
        near = moe.logits(prompts)
    for i, p in enumerate(prompts):
        diff = (near[i, : len(p)] - dense[i, : len(p)]).abs().max()
        assert 2e-3 < diff < 5.0
        agree = (near[i, : len(p)].argmax(-1) == dense[i, : len(p)].argmax(-1)).float().mean()
        assert agree >= 0.75
