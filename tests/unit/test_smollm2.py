"""The bundled SmolLM2-135M-Instruct GGUF: our loader (dequantized to float32) against transformers' own GGUF
loading, and the default quantized load (its Q4_1/Q8_0 blocks kept) against the dequantized one."""

from __future__ import annotations

import torch
from helpers import ACTIVATION_ROUNDING, assert_greedy_agrees
from transformers import GenerationConfig

from meshlm import SamplingParams
from meshlm.kernels.qformat import info


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


PROMPTS = ("Once upon a time", "The theory of relativity states that", "def fibonacci(n):",
           "The capital of Japan is")


def test_default_keeps_the_files_blocks(smollm2_q):
    """LLM(None) runs the Q4_1 file as stored: Q4_1 layers, the Q8_0 embedding shared by the tied head,
    float32 norms; weight bytes are the packed ones."""
    model = smollm2_q.model
    assert info(model.layers["0"].mlp.down_proj.weight).fmt.name == "Q4_1"
    assert info(model.embed_tokens.weight).fmt.name == "Q8_0" and model.lm_head.weight is model.embed_tokens.weight
    assert model.norm.weight.dtype is torch.float32
    d = smollm2_q.rank_info()[0]
    assert set(d["weight_mb_by_format"]) == {"Q4_1", "Q8_0", "float32"} and d["weight_mb"] < 100


def test_quantized_matches_dequantized(smollm2_q, smollm2):
    """Kept quantized: logits within activation rounding of the float32 copy, and the same 32 greedy tokens
    (near-ties of the float32 reference forgiven)."""
    tok = smollm2.tokenizer
    prompts = [tok.encode(t) for t in PROMPTS]
    ours, ref = smollm2_q.logits(prompts[:2]), smollm2.logits(prompts[:2])
    for i, p in enumerate(prompts[:2]):
        err = (ours[i, :len(p)] - ref[i, :len(p)]).square().mean() / ref[i, :len(p)].square().mean()
        assert err.sqrt().item() <= ACTIVATION_ROUNDING
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    got = [o.token_ids for o in smollm2_q.generate(prompts, params)]
    want = [o.token_ids for o in smollm2.generate(prompts, params)]
    assert_greedy_agrees(got, want, prompts, smollm2.logits)


def test_quantized_chat_answers_paris(smollm2_q, smollm2):
    """The France prompt, kept quantized. The answer's first token is a near-tie in float32 ('The' 25.33,
    'L' 25.24), which int8 activations flip to 'L' exactly as llama.cpp does on this file (llama-server
    --jinja, temperature 0, answers the same "L'Étoile, la Marseillaise, ..."): the answer must be the
    float32 copy's up to that near-tie, and once the answer starts as float32's does, it names Paris."""
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2_q.encode_prompt(chat)
    params = SamplingParams(max_tokens=32)
    assert_greedy_agrees([smollm2_q.generate([ids], params)[0].token_ids],
                         [smollm2.generate([ids], params)[0].token_ids], [ids], smollm2.logits)
    start = smollm2.generate([ids], SamplingParams(max_tokens=5))[0]
    assert start.text == "The capital of France is"
    start = list(start.token_ids)
    out = smollm2_q.generate([ids + start], params)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
