"""Tensor parallelism over gloo: exact against one device and against transformers."""

from __future__ import annotations

import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.parallel.styles import head_partition

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NEW_TOKENS = 64
PROMPTS = [[5, 17, 33, 250, 101, 7, 9], [44, 3, 19, 200], [7] * 3 + [300, 301, 302, 303, 304, 99, 12]]
CASES = [("llama_gqa", 2), ("llama_gqa", 4), ("qwen2", 2), ("qwen2", 4), ("mistral", 2), ("mistral", 4),
         ("llama_odd_heads", 2), ("llama_odd_heads", 4), ("mixtral", 2)]


@pytest.fixture(scope="module")
def single(llm):
    """tp=1 greedy outputs per kind (the one-device reference)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = [o.token_ids for o in llm(kind).generate(
                PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))]
        return cache[kind]

    return get


@pytest.mark.parametrize("kind,tp", CASES)
def test_tp_matches_one_device_and_transformers(kind, tp, checkpoint, single, reference):
    """64 greedy tokens identical to tp=1; logits within tolerance of HF; comm bytes as analysed."""
    with LLM(str(checkpoint(kind)), tp=tp, progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        assert [o.token_ids for o in outs] == single(kind)
        logits = llm.logits(PROMPTS)
        ref = reference(kind)
        with torch.no_grad():
            for i, p in enumerate(PROMPTS):
                expected = ref(torch.tensor([p])).logits[0]
                torch.testing.assert_close(logits[i, : len(p)], expected, atol=2e-4, rtol=2e-4)
        # Every rank holds its own share of the weights, never the whole model.
        infos = llm.rank_info()
        assert len(infos) == tp
        heads = head_partition(llm.cfg.num_heads, llm.cfg.num_kv_heads, tp)
        assert [i["q_heads"] for i in infos] == [h.num_q for h in heads]
        total = llm.cfg.num_params() * 4
        assert max(i["weight_mb"] for i in infos) * 1e6 < 0.75 * total


def test_uneven_heads_split_by_kv_groups():
    """SmolLM2's 9 heads / 3 KV heads: tp=2 gives 6 + 3, tp=4 replicates KV heads."""
    assert [h.num_q for h in head_partition(9, 3, 2)] == [6, 3]
    assert [(h.kv_start, h.kv_end) for h in head_partition(9, 3, 2)] == [(0, 2), (2, 3)]
    four = head_partition(9, 3, 4)
    assert sum(h.num_q for h in four) == 9 and all(h.kv_end - h.kv_start == 1 for h in four)
    assert [h.num_q for h in head_partition(9, 3, 9)] == [1] * 9


def test_communication_bytes_match_analysis(checkpoint):
    """All-reduce bytes per decode step = (2 per layer + 1 embedding) x hidden x tokens x 4 bytes."""
    with LLM(str(checkpoint("llama_gqa")), tp=2, progress=False) as llm:
        cfg = llm.cfg
        prompt = [5, 6, 7, 8, 9]
        llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))  # warm
        llm.reset_comm_stats()
        llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
        prefill = llm.comm_stats()[0]
        llm.reset_comm_stats()
        llm.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))  # prefill + 2 decode steps
        both = llm.comm_stats()[0]
    per_token = (2 * cfg.num_layers + 1) * cfg.hidden_size * 4
    assert prefill["tp/all_reduce"]["bytes"] == per_token * len(prompt)
    assert prefill["tp/all_reduce"]["calls"] == 2 * cfg.num_layers + 1
    decode_bytes = both["tp/all_reduce"]["bytes"] - prefill["tp/all_reduce"]["bytes"]
    assert decode_bytes == 2 * per_token
    # The head all-gathers this rank's share of the vocabulary for one position per step.
    assert both["tp/all_gather"]["bytes"] == 3 * (cfg.vocab_size // 2) * 4


@pytest.mark.parametrize("tp", [2, 3])
def test_tp_on_smollm2(tp, smollm2, smollm2_hf):
    """SmolLM2 (9 heads, 3 KV heads) dequantized to float32 at tp=2 (6 + 3 heads) and tp=3, each rank reading
    its rows of the GGUF in place (the quantized default: test_quant_tp.py)."""
    tok = smollm2.tokenizer
    prompts = [tok.encode("Once upon a time"), tok.encode("The three laws of robotics are")]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [o.token_ids for o in smollm2.generate(prompts, params)]
    with LLM(None, tp=tp, dtype="float32", progress=False) as llm:
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        logits = llm.logits(prompts)
        infos = llm.rank_info()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = smollm2_hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[i, : len(p)], ref, atol=2e-3, rtol=2e-3)
    assert [i["q_heads"] for i in infos] == [h.num_q for h in head_partition(9, 3, tp)]
