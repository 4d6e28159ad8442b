"""Tensor parallelism of quantized weights: column shards are row ranges, row shards whole 32-blocks with the
input zero-padded where a head (or the intermediate split) ends inside a block; against tp=1 and float32."""

from __future__ import annotations

import pytest
from helpers import ACTIVATION_ROUNDING, assert_greedy_agrees, write_gguf_model

from meshlm import LLM, SamplingParams
from meshlm.kernels.qformat import info

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PROMPTS = [[5, 17, 33, 250, 101, 7, 9], [44, 3, 19, 200], [7] * 3 + [300, 301, 302, 303, 304, 99, 12]]
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)


def _close(ours, ref, rel: float) -> None:
    err = ((ours - ref).square().mean() / ref.square().mean()).sqrt().item()
    assert err <= rel, f"relative RMS error {err:.4f} > {rel}"


def _tokens(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_head_boundary_inside_a_block(tmp_path, qtype):
    """head_dim 48, 6 heads / 2 KV heads, intermediate 160 at tp=2: rank 0's o_proj columns [0, 144) and
    down_proj columns [0, 80) end inside a block; it holds the whole blocks and pads x with 16 zero columns.
    Logits match tp=1 and the dequantized float32 load; greedy tokens match tp=1."""
    path = str(write_gguf_model(tmp_path / "hd48.gguf", qtype, hidden=288, inter=160, heads=6, kv_heads=2,
                                head_dim=48))
    with LLM(path, progress=False) as one, LLM(path, dtype="float32", progress=False) as flt, \
            LLM(path, tp=2, progress=False) as two:
        layer = two.model.layers["0"]  # rank 0's shard
        assert info(layer.self_attn.o_proj.weight).pad == (0, 16) and info(layer.self_attn.o_proj.weight).k == 160
        assert info(layer.mlp.down_proj.weight).pad == (0, 16) and info(layer.mlp.down_proj.weight).k == 96
        assert info(layer.self_attn.q_proj.weight).n == 3 * 48
        logits = two.logits(PROMPTS)
        _close(logits, one.logits(PROMPTS), ACTIVATION_ROUNDING)
        _close(logits, flt.logits(PROMPTS), ACTIVATION_ROUNDING)
        assert_greedy_agrees(_tokens(two), _tokens(one), PROMPTS, one.logits)
        assert max(i["weight_mb"] for i in two.rank_info()) < 0.75 * one.rank_info()[0]["weight_mb"]


def test_quantize_tp2_matches_tp1(checkpoint):
    """--quantize int4 on qwen2 (6 heads of 16 / 2 KV heads, intermediate 160, tied embeddings) at tp=2: rank
    shards cut inside blocks (o_proj at column 48, down_proj at 80) and quantize the same blocks as tp=1."""
    path = str(checkpoint("qwen2"))
    with LLM(path, quantize="int4", progress=False) as one:
        want, ref = _tokens(one), one.logits(PROMPTS)
        with LLM(path, quantize="int4", tp=2, progress=False) as two:
            assert info(two.model.layers["0"].self_attn.o_proj.weight).pad == (0, 16)
            assert two.model.lm_head.weight is two.model.embed_tokens.weight  # tied, packed once
            _close(two.logits(PROMPTS), ref, ACTIVATION_ROUNDING)
            assert_greedy_agrees(_tokens(two), want, PROMPTS, one.logits)


def test_smollm2_quantized_tp2(smollm2):
    """The bundled Q4_1 model kept quantized at tp=2 (6 + 3 heads): the float32 copy's greedy tokens (near-ties
    forgiven) on three prompts and the France chat prompt, and Paris (see test_smollm2's France test)."""
    tok = smollm2.tokenizer
    prompts = [tok.encode(t) for t in ("Once upon a time", "The theory of relativity states that",
                                       "def fibonacci(n):")]
    prompts.append(smollm2.encode_prompt([{"role": "user", "content": "What is the capital of France?"}]))
    want = _tokens(smollm2, prompts)
    start = smollm2.generate([prompts[-1]], SamplingParams(max_tokens=5))[0]
    assert start.text == "The capital of France is"
    with LLM(None, tp=2, progress=False) as two:
        assert [i["q_heads"] for i in two.rank_info()] == [6, 3]
        assert_greedy_agrees(_tokens(two, prompts), want, prompts, smollm2.logits)
        out = two.generate([prompts[-1] + list(start.token_ids)], SamplingParams(max_tokens=8))[0]
        assert "Paris" in out.text


def test_smollm2_quantized_pp2(smollm2_q):
    """Kept quantized over 2 pipeline stages: the last stage's tied head reads the packed Q8_0 embedding
    table without the embedding beside it; the same greedy tokens as one process."""
    prompts = [smollm2_q.tokenizer.encode(t) for t in ("Once upon a time", "def fibonacci(n):")]
    with LLM(None, pp=2, progress=False) as two:
        assert_greedy_agrees(_tokens(two, prompts), _tokens(smollm2_q, prompts), prompts, smollm2_q.logits)
        assert sum(i["weight_mb"] for i in two.rank_info()) < 1.5 * smollm2_q.rank_info()[0]["weight_mb"]
