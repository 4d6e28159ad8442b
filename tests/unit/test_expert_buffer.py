"""Expert buffering: outputs identical with a budget of one expert, half and all; the LFU-with-aging policy
beats LRU of the same capacity on a skewed routing trace; hits, misses and fetch time are counted."""

from __future__ import annotations

import random

import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.engine.expert_buffer import LFU, LRU, ExpertCache, expert_bytes, hit_rate
from meshlm.errors import ConfigError

PROMPTS = [[5, 17, 33, 250, 101, 7, 9], [44, 3, 19, 200]]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def skewed_trace(layers=4, experts=16, top_k=2, tokens=3000, alpha=1.2, seed=0) -> list:
    """Per token and layer, top_k distinct experts drawn from a Zipf(alpha) popularity (a different hot set per
    layer), as a MoE's decode steps route."""
    rng = random.Random(seed)
    perms = [rng.sample(range(experts), experts) for _ in range(layers)]
    weights = [1 / (i + 1) ** alpha for i in range(experts)]
    trace = []
    for _ in range(tokens):
        for layer in range(layers):
            picked: list[int] = []
            while len(picked) < top_k:
                e = perms[layer][rng.choices(range(experts), weights)[0]]
                if e not in picked:
                    picked.append(e)
            trace += [(layer, e) for e in sorted(picked)]
    return trace


@pytest.mark.parametrize("capacity", [8, 16, 32])
def test_lfu_with_aging_beats_lru_on_a_skewed_trace(capacity):
    trace = skewed_trace()
    lfu, lru = hit_rate(LFU(capacity), trace), hit_rate(LRU(capacity), trace)
    assert lfu > lru + 0.02, (lfu, lru)


def test_policies_never_exceed_capacity():
    for policy in (LFU(3), LRU(3)):
        for k in skewed_trace(tokens=50):
            policy.access(k)
            assert len(policy.resident) <= 3


@pytest.fixture(scope="module")
def reference_run(checkpoint):
    """All experts resident: greedy tokens and full logits."""
    with LLM(str(checkpoint("qwen2_moe")), progress=False) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)], llm.logits(PROMPTS), llm.cfg


@pytest.mark.parametrize("share", ["one", "half", "all"])
def test_outputs_identical_with_any_budget(share, checkpoint, reference_run):
    tokens, logits, cfg = reference_run
    one = expert_bytes(cfg, torch.float32)
    moe_layers = sum(cfg.is_sparse(i) for i in range(cfg.num_layers))
    total = cfg.num_experts * moe_layers
    budget = {"one": one, "half": one * total // 2, "all": one * total}[share]
    with LLM(str(checkpoint("qwen2_moe")), expert_budget=budget, progress=False) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == tokens
        assert torch.equal(llm.logits(PROMPTS), logits)
        buf = llm.expert_stats()[0]["buffer"]
        figures = llm.engine.stats().experts
    assert buf["capacity"] == budget // one and buf["resident"] <= buf["capacity"]
    assert buf["misses"] > 0 and buf["fetch_seconds"] > 0
    assert figures.buffer_hits == buf["hits"] and figures.buffer_misses == buf["misses"]
    if share == "one":
        assert buf["hits"] < buf["misses"]
    if share == "all":
        assert buf["misses"] + buf["prefetched"] <= total  # each expert read once, then resident
    if share != "one":
        assert buf["prefetched"] > 0  # the next MoE layer's router, applied early, read experts ahead


def test_cache_prefetches_in_the_background_within_capacity():
    """A prefetched expert is a hit when used; the pool never holds more than its capacity; reads are timed."""
    reads = []

    def fetch(key):
        reads.append(key)
        return (torch.full((2,), float(key[1])),) * 3

    cache = ExpertCache(3, fetch)
    cache.prefetch([(1, 4), (1, 5), (1, 6)])  # capacity - 1 = 2 of them
    assert len(cache.store) == 2
    assert cache.get((1, 4))[0].tolist() == [4.0, 4.0] and cache.hits == 1 and cache.misses == 0
    cache.get((0, 0))
    cache.get((0, 1))
    cache.pool.submit(lambda: None).result()  # one FIFO thread: (1, 5)'s read, evicted before it ran, has run too
    assert cache.misses == 2 and len(cache.store) == 3 and sorted(reads) == [(0, 0), (0, 1), (1, 4), (1, 5)]
    assert cache.snapshot()["hit_rate"] == pytest.approx(1 / 3) and cache.fetch_seconds > 0


def test_budget_below_one_expert_is_refused(checkpoint):
    with pytest.raises(ConfigError, match=r"holds no expert: one takes \d+ bytes"):
        LLM(str(checkpoint("qwen2_moe")), expert_budget=10, progress=False)
