"""The whole-stack CPU decode op (kernels/decode.cpp) against the per-op path it replaces: the same logits
and the same KV-cache contents, bit for bit, for every weight format, GQA, biases, a sliding window, random
block tables with positions crossing block boundaries, several batch sizes and thread counts."""

from __future__ import annotations

import random

import pytest
import torch

from meshlm import LLM
from meshlm.engine.paged_attention import SeqInput, StepInput
from meshlm.kernels.gemv import kernel, vnni

BS = 4  # tokens per block: small, so decodes cross block boundaries often

CASES = [  # (checkpoint kind, dtype, --quantize)
    ("llama_gqa", "float32", None),
    ("llama_gqa", "bfloat16", None),
    ("llama_gqa", "float32", "int8"),  # Q8_0
    ("llama_gqa", "float32", "int4"),  # Q4_0
    ("llama_gqa", "bfloat16", "int4-min"),  # Q4_1, bf16 activations
    ("qwen2", "float32", None),  # q/k/v biases, tied embeddings
    ("llama_bias", "bfloat16", None),  # biases on o and the MLP too
    ("mistral_window", "float32", None),  # sliding window: attention starts inside a block
]


def _run(runner, step: StepInput, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, K pool, V pool) after one step, through the stack op or the per-op path, from the same pools."""
    cache = runner.cache
    k0, v0 = cache.k.clone(), cache.v.clone()
    stack = cache.stack
    if not fused:
        cache.stack = None
    try:
        out = runner.forward(step)
    finally:
        cache.stack = stack
    k1, v1 = cache.k.clone(), cache.v.clone()
    cache.k.copy_(k0)
    cache.v.copy_(v0)
    return out, k1, v1


def _decode_step(seqs: list[dict], tokens: list[int]) -> StepInput:
    """One new token for each sequence (positions at its current length)."""
    return StepInput(tuple(tokens), tuple(SeqInput(i, s["len"], 1, s["table"]) for i, s in enumerate(seqs)),
                     tuple(range(len(seqs))))


@pytest.mark.parametrize("kind,dtype,quantize", CASES)
def test_stack_matches_per_op_path(checkpoint, kind, dtype, quantize):
    """Decode steps of M = 1..3 and 9 rows (from 8 rows on, threads share out the elementwise work by rows):
    the stack op's logits and KV writes equal the per-op path's bitwise, a row's logits do not depend on the
    rows beside it, and 1 and 2 threads agree."""
    if kernel() is None:
        pytest.skip("the CPU kernels are not built here (no AVX-512 or no compiler): there is no stack op")
    if quantize is not None and not vnni():
        pytest.skip("quantized formats need AVX-512 VNNI for the kernels")
    llm = LLM(str(checkpoint(kind)), dtype=dtype, quantize=quantize, progress=False)
    try:
        runner = llm.executor.worker.runner
        runner.allocate(128, BS)
        runner.cache.k.zero_()  # torch.empty pools: garbage (NaN included) where no step writes
        runner.cache.v.zero_()
        assert runner.cache.stack is not None, "the stack op should apply to a plain tp=1 CPU model"
        rng = random.Random(0)
        vocab = runner.cfg.vocab_size
        order = list(range(128))
        rng.shuffle(order)
        seqs, offset, prompt = [], 0, []
        for i in range(9):  # prompts of 3..13 tokens over random blocks
            n = rng.randrange(3, 14)
            seqs.append({"len": n, "table": tuple(order[12 * i:12 * i + 12]), "offset": offset})
            prompt += [rng.randrange(3, vocab) for _ in range(n)]
            offset += n
        prefill = StepInput(tuple(prompt), tuple(SeqInput(s["offset"], 0, s["len"], s["table"]) for s in seqs),
                            tuple(s["offset"] + s["len"] - 1 for s in seqs))
        runner.forward(prefill)  # a mixed step: the per-op path
        threads = torch.get_num_threads()
        for it in range(7):
            batch = seqs if it % 2 == 0 else rng.sample(seqs, rng.randrange(1, 4))
            step = _decode_step(batch, [rng.randrange(3, vocab) for _ in batch])
            fused, kf, vf = _run(runner, step, True)
            ref, kr, vr = _run(runner, step, False)
            assert torch.equal(fused, ref), f"step {it}: logits differ from the per-op path"
            assert torch.equal(kf, kr) and torch.equal(vf, vr), f"step {it}: KV writes differ"
            torch.set_num_threads(1 if threads > 1 else 2)
            try:
                assert torch.equal(_run(runner, step, True)[0], fused), "the thread count changed a result"
            finally:
                torch.set_num_threads(threads)
            alone = _run(runner, _decode_step(batch[:1], list(step.token_ids[:1])), True)[0]
            assert torch.equal(alone[0], fused[0]), "a row's logits depend on the rest of its batch"
            runner.forward(step)  # commit the step
            for s in batch:
                s["len"] += 1
    finally:
        llm.close()
