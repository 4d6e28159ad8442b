"""Draft-model and self-int4 speculation through meshlm.LLM: greedy output equals greedy without speculation,
at tp=1, pp=2 and tp=2, and the draft's KV pool is empty once every request has ended."""

from __future__ import annotations

import random

import pytest

from meshlm import LLM, SamplingParams
from meshlm.engine.speculative import SpeculativeConfig

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KIND = "llama_gqa"
GREEDY = SamplingParams(max_tokens=64, ignore_eos=True)
# tp=2: the target's ranks own this process's default group while the draft runs beside them without one
LAYOUTS = [pytest.param((1, 1), id="tp1"), pytest.param((1, 2), id="pp2"), pytest.param((2, 1), id="tp2")]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 3..40 tokens, one of them repeating itself (so a draft gets long runs accepted)."""
    rng = random.Random(seed)
    out = [[rng.randrange(3, 512) for _ in range(rng.randrange(3, 41))] for _ in range(n - 1)]
    return out + [[5, 6, 7, 8, 9] * 6]


@pytest.fixture(scope="module")
def baseline(checkpoint) -> list[list[int]]:
    """Greedy tokens without speculation (one device; pp=2 equals it: tests/distributed/test_engine_pp.py)."""
    with LLM(str(checkpoint(KIND)), dtype="float32", progress=False) as llm:
        return [o.token_ids for o in llm.generate(prompts(4), GREEDY)]


def methods(checkpoint) -> dict[str, str]:
    """Proposers: the target's own checkpoint as its draft (mostly accepted), another model with the same
    tokenizer (mostly rejected), and the target quantized to int4."""
    return {"same": f"draft:{checkpoint(KIND)}", "other": f"draft:{checkpoint('mistral')}", "self-int4": "self-int4"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", ["same", "other", "self-int4"])
def test_greedy_with_a_draft_equals_greedy_without(checkpoint, baseline, layout, which):
    spec = SpeculativeConfig(methods(checkpoint)[which], num_tokens=4, adaptive=False)
    tp, pp = layout
    with LLM(str(checkpoint(KIND)), dtype="float32", tp=tp, pp=pp, progress=False, speculative=spec) as llm:
        one = [llm.generate([p], GREEDY)[0].token_ids for p in prompts(4)[:2]]  # alone
        batch = [o.token_ids for o in llm.generate(prompts(4), GREEDY)]  # together
        stats = llm.engine.stats().speculative
        proposer = llm.engine.spec.proposer
    assert one == baseline[:2]
    assert batch == baseline
    assert stats.proposed > 0
    if which == "same":
        assert stats.acceptance_rate > 0.9
    assert proposer.name == ("self-int4" if which == "self-int4" else "draft")
    assert proposer.blocks.num_free == proposer.blocks.num_blocks and not proposer.seqs  # every request released


def test_sampled_draft_speculation_reproduces(checkpoint):
    """A seed reproduces with a fixed k (adaptive=False): the target's verification draws from the request's
    one stream, so a k the policy picks from measured timings changes which draws land where."""
    params = SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)
    runs = []
    for _ in range(2):
        with LLM(str(checkpoint(KIND)), dtype="float32", progress=False,
                 speculative=SpeculativeConfig("self-int4", adaptive=False)) as llm:
            runs.append([o.token_ids for o in llm.generate(prompts(3), params)])
            assert llm.engine.stats().speculative.proposed > 0
    assert runs[0] == runs[1]
