"""The engine: batch invariance, chunked prefill, preemption, prefix caching, no leaks, admission."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig
from meshlm.engine.scheduler import SchedulerConfig
from meshlm.errors import RequestError

KIND = "llama_gqa"
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def mixed_prompts(n: int, seed: int = 0, vocab: int = 512) -> list[list[int]]:
    """n prompts of mixed lengths (3..60 tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 61))] for _ in range(n)]


@pytest.fixture(scope="module")
def solo(llm):
    """Each prompt's greedy output generated alone."""
    engine_llm = llm(KIND)
    prompts = mixed_prompts(32)
    return prompts, [engine_llm.generate([p], GREEDY)[0].token_ids for p in prompts]


@pytest.mark.parametrize("batch", [8, 32])
def test_batch_invariance(llm, solo, batch):
    """Greedy tokens of a request are the same alone and inside a mixed batch."""
    prompts, alone = solo
    outs = llm(KIND).generate(prompts[:batch], GREEDY)
    assert [o.token_ids for o in outs] == alone[:batch]


def test_chunked_prefill_equals_whole(checkpoint, solo):
    """A tiny token budget forces chunked prefill and mixed prefill/decode steps: same tokens."""
    prompts, alone = solo
    cfg = EngineConfig(scheduler=SchedulerConfig(max_num_batched_tokens=7, max_num_seqs=5))
    with LLM(str(checkpoint(KIND)), progress=False, engine=cfg) as small:
        outs = small.generate(prompts[:8], GREEDY)
    assert [o.token_ids for o in outs] == alone[:8]


def test_preemption_recomputes_exactly(checkpoint, solo):
    """With KV blocks for far fewer tokens than the batch needs, every request still completes exactly."""
    prompts, alone = solo
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x block x kv heads x head_dim x fp32
    cfg = EngineConfig(kv_cache_mb=12 * block_bytes / 2**20)  # 12 blocks = 192 tokens for 16 requests
    with LLM(str(checkpoint(KIND)), progress=False, engine=cfg) as tight:
        assert tight.engine.blocks.num_blocks == 12
        outs = tight.generate(prompts[:16], GREEDY)
        assert tight.engine.scheduler.num_preemptions > 0
        assert sum(o.num_preemptions for o in outs) == tight.engine.scheduler.num_preemptions
        assert tight.engine.blocks.num_free == 12
    assert [o.token_ids for o in outs] == alone[:16]


def test_prefix_cache_reuses_blocks(llm):
    """A second request sharing a long prefix reuses the first one's blocks and decodes identically."""
    engine_llm = llm(KIND)
    blocks = engine_llm.engine.blocks
    prefix = mixed_prompts(1, seed=7)[0] + mixed_prompts(1, seed=8)[0]  # long shared prefix
    first = engine_llm.generate([prefix + [11, 12]], GREEDY)[0]
    hits = blocks.stats.prefix_hits
    second = engine_llm.generate([prefix + [11, 12]], GREEDY)[0]
    reused = blocks.stats.prefix_hits - hits
    assert reused == (len(prefix) + 1) // blocks.block_size
    assert second.num_cached_tokens == reused * blocks.block_size
    assert second.token_ids == first.token_ids
    other = engine_llm.generate([prefix + [13]], GREEDY)[0]  # diverges after the prefix
    with LLM(str(engine_llm.path), progress=False) as fresh:
        assert fresh.generate([prefix + [13]], GREEDY)[0].token_ids == other.token_ids


def test_request_larger_than_pool_is_rejected(checkpoint):
    """Admission refuses at once a request whose KV need exceeds the whole pool."""
    cfg = EngineConfig(kv_cache_mb=4 * 8192 / 2**20)  # 4 blocks = 64 tokens
    with LLM(str(checkpoint(KIND)), progress=False, engine=cfg) as tiny:
        with pytest.raises(RequestError, match="whole pool"):
            tiny.engine.add_request(list(range(3, 50)), SamplingParams(max_tokens=40))
        assert not tiny.engine.has_unfinished()


def test_per_request_sampling_and_logprobs(llm):
    """Different sampling params in one batch; seeded requests reproduce; logprobs carry alternatives."""
    engine_llm = llm(KIND)
    p = mixed_prompts(3, seed=3)
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5),
              SamplingParams(max_tokens=8, temperature=1.2, top_p=0.8, seed=9, ignore_eos=True)]
    a = engine_llm.generate(p, params)
    b = engine_llm.generate(p[::-1], params[::-1])[::-1]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    lp = a[1].logprobs
    assert len(lp) == 8 and all(len(t.top) == 5 for t in lp)
    assert all(t.token_id == max(t.top, key=t.top.get) for t in lp)  # greedy picks the top alternative


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_leak_under_random_arrivals_and_aborts(llm, data):
    """Whatever arrives, aborts or runs out of blocks, every block is free once all requests end."""
    engine = llm(KIND).engine
    blocks = engine.blocks
    live: list[str] = []
    for _ in range(data.draw(st.integers(1, 12))):
        action = data.draw(st.sampled_from(["add", "add", "step", "abort"]))
        if action == "add":
            n = data.draw(st.integers(1, 40))
            prompt = [data.draw(st.integers(3, 511)) for _ in range(n)]
            req = engine.add_request(prompt, SamplingParams(max_tokens=data.draw(st.integers(1, 12)),
                                                            ignore_eos=True))
            live.append(req.id)
        elif action == "step":
            engine.step()
        elif live:
            engine.abort(live.pop(data.draw(st.integers(0, len(live) - 1))))
    for rid in live[: data.draw(st.integers(0, len(live)))]:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert blocks.num_free == blocks.num_blocks
    assert all(r == 0 for r in blocks.ref)
