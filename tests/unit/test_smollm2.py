"""The bundled SmolLM2-135M-Instruct GGUF: our loader against transformers' own GGUF loading."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from meshlm import SamplingParams


def test_logits_and_greedy_match_transformers(smollm2, smollm2_hf):
    """Same logits within tolerance on ragged prompts and the same 32 greedy tokens."""
    tok = smollm2.tokenizer
    prompts = [tok.encode(t) for t in ("Once upon a time", "The theory of relativity states that",
                                       "def fibonacci(n):")]
    ours = smollm2.logits(prompts)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = smollm2_hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(ours[i, : len(p)], ref, atol=2e-3, rtol=2e-3)
    outs = smollm2.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    gen = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        for p, out in zip(prompts, outs):
            ref = smollm2_hf.generate(torch.tensor([p]), generation_config=gen)[0, len(p):].tolist()
            assert out.token_ids == ref


def test_chat_answers_paris(smollm2):
    """The chat template is applied and the answer makes sense."""
    out = smollm2.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                           SamplingParams(max_tokens=32))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn with <|im_end|>


def test_default_model_is_smollm2(smollm2):
    """Every command without --model uses the bundled SmolLM2."""
    assert smollm2.cfg.num_layers == 30 and smollm2.cfg.num_heads == 9 and smollm2.cfg.num_kv_heads == 3
    assert smollm2.cfg.tie_word_embeddings
