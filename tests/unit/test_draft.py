"""Draft-model and self-int4 proposers (engine/draft.py) against the draft model's own generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from meshlm import LLM
from meshlm.config import SamplingParams
from meshlm.engine.draft import DraftProposer, check_same_tokenizer
from meshlm.engine.request import Request
from meshlm.engine.sampler import target_probs
from meshlm.errors import ConfigError

VOCAB = 512  # llama_gqa's (and mistral's: same tokenizer)
PROMPTS = [[5, 17, 42, 99, 7, 256, 31], [300, 12, 8, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 3]]
GREEDY = SamplingParams(max_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_path(checkpoint):
    return str(checkpoint("llama_gqa"))


@pytest.fixture(scope="module")
def draft_llm(draft_path):
    """The draft checkpoint under meshlm.LLM: the reference for what the proposer must propose."""
    with LLM(draft_path, dtype="float32", progress=False) as model:
        yield model


@pytest.fixture(scope="module")
def proposer(draft_path):
    return DraftProposer(draft_path, None, VOCAB)


def continuation(model: LLM, prompt: list[int], n: int) -> list[int]:
    """The model's own greedy continuation of prompt."""
    return model.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids


def req(rid: str, tokens: list[int], params: SamplingParams = GREEDY) -> Request:
    """A running request whose tokens (prompt + generated) are `tokens`."""
    return Request(rid, list(tokens), params, max_new=64)


def test_greedy_proposals_are_the_drafts_own_continuation(proposer, draft_llm):
    assert proposer.name == "draft"
    got = proposer.propose([req("a", PROMPTS[0]), req("b", PROMPTS[1]), req("c", PROMPTS[0])], [8, 5, 0])
    assert [p.tokens for p in got] == [tuple(continuation(draft_llm, PROMPTS[0], 8)),
                                       tuple(continuation(draft_llm, PROMPTS[1], 5)), ()]
    assert all(p.probs is None for p in got)
    for rid in "abc":
        proposer.release(rid)
    assert proposer.blocks.num_free == proposer.blocks.num_blocks  # release frees every block


def test_catch_up_and_rollback_match_a_fresh_proposer(proposer, draft_path):
    prompt = PROMPTS[1]
    first = proposer.propose([req("r", prompt)], [6])[0].tokens
    bonus = (first[2] + 1) % VOCAB  # the target accepted two, then chose another token than the draft's third
    partial = prompt + list(first[:2]) + [bonus]
    full = prompt + list(first) + [7]  # every draft accepted plus a bonus token
    fresh = DraftProposer(draft_path, None, VOCAB)
    for tokens in (partial, full, partial):  # catch-up after a partial accept, after a full one, then roll back
        again = proposer.propose([req("r", tokens)], [6])[0].tokens
        assert again == fresh.propose([req(f"f{len(tokens)}", tokens)], [6])[0].tokens
        s = proposer.seqs["r"]
        assert s.tokens == tokens + list(again[:-1])  # KV held: the request's tokens and the drafts but the last
        assert len(s.table) == proposer.blocks.blocks_for(len(s.tokens))
    proposer.release("r")
    assert proposer.blocks.num_free == proposer.blocks.num_blocks


def test_sampled_proposals_reproduce_and_carry_their_distribution(draft_path, draft_llm):
    params = SamplingParams(max_tokens=64, temperature=0.8, top_k=60, top_p=0.9, seed=1234)
    runs = []
    for _ in range(2):  # two fresh proposers, same seed: same tokens, same rows
        p = DraftProposer(draft_path, None, VOCAB + 88)  # a target vocabulary larger than the draft's
        runs.append(p.propose([req("s", PROMPTS[0], params), req("g", PROMPTS[1])], [5, 3]))
    (a, greedy), (b, _) = runs
    assert a.tokens == b.tokens and torch.equal(a.probs, b.probs)
    assert greedy.probs is None and len(greedy.tokens) == 3
    assert a.probs.shape == (5, VOCAB + 88) and a.probs.dtype == torch.float32
    assert torch.allclose(a.probs.sum(-1), torch.ones(5), atol=1e-5)
    assert (a.probs[:, VOCAB:] == 0).all()
    assert all(a.probs[j, t] > 0 for j, t in enumerate(a.tokens))
    # each row is the draft model's distribution after the request's temperature / top-k / top-p
    logits = draft_llm.executor.worker.logits([PROMPTS[0] + list(a.tokens[:-1])])[0]  # [S, V]
    n = len(PROMPTS[0])
    ref = target_probs(logits[n - 1:n - 1 + 5], params)
    ref = ref / ref.sum(-1, keepdim=True)
    assert torch.allclose(a.probs[:, :VOCAB], ref, atol=1e-5)


def test_sampled_proposals_depend_on_seed_and_context_only(draft_path):
    """A draft token is a function of the request's seed and tokens, not of how many draws came before."""
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=99)
    a, b = DraftProposer(draft_path, None, VOCAB), DraftProposer(draft_path, None, VOCAB)
    short = a.propose([req("s", PROMPTS[1], params)], [2])[0]
    again = a.propose([req("s", PROMPTS[1], params)], [5])[0]  # same context, after two draws
    fresh = b.propose([req("t", PROMPTS[1], params)], [5])[0]
    assert again.tokens == fresh.tokens and again.tokens[:2] == short.tokens
    assert torch.allclose(again.probs, fresh.probs, atol=1e-6)  # KV reused vs recomputed: rounding only
    other = b.propose([req("u", PROMPTS[1], SamplingParams(max_tokens=64, temperature=1.0, seed=100))], [5])[0]
    assert other.tokens != fresh.tokens  # another seed draws otherwise (5 tokens from a 512-token vocabulary)


def test_a_full_pool_proposes_fewer_tokens(draft_path, draft_llm):
    p = DraftProposer(draft_path, None, VOCAB, num_blocks=2)  # 32 slots
    prompt = PROMPTS[1]  # 19 tokens: room for 32 - 19 + 1 = 14 drafts
    got = p.propose([req("x", prompt), req("y", PROMPTS[0])], [20, 4])
    assert got[0].tokens == tuple(continuation(draft_llm, prompt, 14))
    assert got[1].tokens == ()  # no block left for the second request
    p.release("x")
    assert p.propose([req("y", PROMPTS[0])], [4])[0].tokens == tuple(continuation(draft_llm, PROMPTS[0], 4))


def test_a_draft_with_another_tokenizer_is_refused(checkpoint, tmp_path):
    target = checkpoint("llama_gqa")
    check_same_tokenizer(target, checkpoint("mistral"))  # another model, the same tokenizer
    with pytest.raises(ConfigError, match="does not share the tokenizer") as e:
        check_same_tokenizer(target, checkpoint("qwen2"))  # 1024 tokens against 512
    assert str(checkpoint("qwen2")) in str(e.value) and str(target) in str(e.value)
    assert "vocabularies differ" in str(e.value)
    other = shutil.copytree(target, tmp_path / "other-eos")  # same vocabulary, another end-of-sequence token
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<unk>"}))
    with pytest.raises(ConfigError, match="eos_token '</s>' vs '<unk>'"):
        check_same_tokenizer(target, other)


def test_self_int4_builds_from_a_float_checkpoint(draft_path):
    p = DraftProposer(draft_path, "int4", VOCAB)
    assert p.name == "self-int4" and "Q4_0" in p.worker.format_bytes
    with LLM(draft_path, quantize="int4", progress=False) as int4:
        want = continuation(int4, PROMPTS[0], 6)
    assert p.propose([req("q", PROMPTS[0])], [6])[0].tokens == tuple(want)


def test_self_int4_takes_a_4bit_gguf_as_is_and_refuses_other_quantized_files(tmp_path):
    from helpers import write_gguf_model

    q4 = DraftProposer(str(write_gguf_model(tmp_path / "q4.gguf", "Q4_0")), "int4", 500)
    assert q4.name == "self-int4" and "Q4_0" in q4.worker.format_bytes
    with pytest.raises(ConfigError, match="self-int4 needs float weights"):
        DraftProposer(str(write_gguf_model(tmp_path / "q8.gguf", "Q8_0")), "int4", 500)


def test_llm_refuses_a_draft_with_another_tokenizer(checkpoint):
    with pytest.raises(ConfigError, match="does not share the tokenizer"):
        LLM(str(checkpoint("llama_gqa")), progress=False, speculative=f"draft:{checkpoint('qwen2')}")
