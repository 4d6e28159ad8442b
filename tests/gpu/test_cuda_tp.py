"""Two GPUs: tp=2 (NCCL) and pp=2 against transformers, the server at tp=2, and the lifecycle on CUDA."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from test_cuda import NEW_TOKENS, check_serve_on_cuda, hf_greedy, prompts_for

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig
from meshlm.errors import ConfigError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA GPUs (torch.cuda.device_count() < 2)")

KV = EngineConfig(kv_cache_mb=64)


def test_tp2_matches_transformers(checkpoint, reference):
    """tp=2 over cuda:0 and cuda:1 with an uneven head split: the ranks sit on their own GPUs, the tp
    all-reduces run on NCCL, and logits and 32 greedy tokens equal transformers'."""
    ref = reference("llama_odd_heads")
    with LLM(str(checkpoint("llama_odd_heads")), tp=2, device="cuda", progress=False, engine=KV) as llm:
        assert [r["device"] for r in llm.rank_info()] == ["cuda:0", "cuda:1"]
        prompts = prompts_for(llm.cfg.vocab_size)
        ours = llm.logits(prompts)
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        stats = llm.comm_stats()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            torch.testing.assert_close(ours[i, : len(p)], ref(torch.tensor([p])).logits[0], atol=1e-3, rtol=1e-3)
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ref, p, NEW_TOKENS)
    for rank in stats:
        assert rank["tp/all_reduce"]["calls"] > 0 and rank["tp/all_reduce"]["transport"] == "nccl"


def test_pp2_matches_transformers(checkpoint, reference):
    """pp=2, one stage per GPU: hidden states cross on NCCL, the step's header and the logits on gloo."""
    ref = reference("llama_gqa")
    with LLM(str(checkpoint("llama_gqa")), pp=2, device="cuda", progress=False, engine=KV) as llm:
        prompts = prompts_for(llm.cfg.vocab_size)
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ref, p, NEW_TOKENS)


def test_close_clash_and_again_on_cuda(checkpoint):
    """On NCCL too: a second live tp=2 LLM is refused naming close(); after close() one starts again, and no
    rank process is left."""
    path = str(checkpoint("llama_gqa"))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = LLM(path, tp=2, device="cuda", progress=False, engine=KV)
    expected = first.generate([[5, 9, 23]], params)[0].token_ids
    with pytest.raises(ConfigError, match=r"close\(\)"):
        LLM(path, tp=2, device="cuda", progress=False, engine=KV)
    first.close()
    with LLM(path, tp=2, device="cuda", progress=False, engine=KV) as again:
        assert again.generate([[5, 9, 23]], params)[0].token_ids == expected
    assert not [p for p in mp.active_children() if p.name.startswith("meshlm-rank")]


def test_smollm2_tp2_serve_on_cuda(smollm2_hf, tmp_path):
    """`meshlm serve --tp 2 --device cuda` (the bundled model): the completion is transformers' greedy text."""
    check_serve_on_cuda(smollm2_hf, tmp_path, tp=2)
