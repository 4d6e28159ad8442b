"""Speculative decoding at tp=2, pp=2 and tp=2 x pp=2: greedy outputs equal one device without speculation,
and at pp=2 every rank ran every step at the positions the driver planned (the position ledger)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import Oracle
from helpers import repeat_prompts as prompts

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig
from meshlm.engine.speculative import NgramProposer, SpeculativeConfig

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GREEDY = SamplingParams(max_tokens=64, ignore_eos=True)
ALWAYS = SpeculativeConfig("ngram", num_tokens=4, adaptive=False)


def checked_steps(engine) -> list[int]:
    """Record how many steps each position check covered (wraps engine.check_positions)."""
    seen: list[int] = []
    check = engine.check_positions

    def wrapped():
        seen.append(check())
        return seen[-1]

    engine.check_positions = wrapped
    return seen


def run_both(llm, ps, params=GREEDY):
    """Outputs with the n-gram proposer, then with the oracle proposer (from one-device references)."""
    refs = {}
    outs = []
    for proposer in ("ngram", "oracle"):
        llm.engine.spec.proposer = NgramProposer() if proposer == "ngram" else Oracle(refs)
        outs.append([o.token_ids for o in llm.generate(ps, params)])
        refs = dict(zip(map(tuple, ps), outs[0]))
    return outs


def test_speculative_tp2_alone_and_batched(checkpoint, llm):
    """tp=2 (uneven heads): greedy with speculation equals one device without, alone and in a batch."""
    kind = "llama_odd_heads"
    ps = prompts(6, seed=1)
    alone = [llm(kind).generate([p], GREEDY)[0].token_ids for p in ps]
    with LLM(str(checkpoint(kind)), tp=2, progress=False, speculative=ALWAYS) as tp2:
        tp2.engine.spec.proposer = Oracle(dict(zip(map(tuple, ps), alone)))
        assert tp2.generate([ps[0]], GREEDY)[0].token_ids == alone[0]
        ngram, oracle = run_both(tp2, ps)
        assert ngram == alone and oracle == alone
        assert tp2.engine.stats().speculative.accepted > 0


def test_speculative_pp2_positions_preemption_abort_prefix(checkpoint, llm, monkeypatch):
    """pp=2 with steps in flight and a pool small enough to preempt: exact greedy outputs; the position ledger
    of both stages is checked after every step; an abort mid-stream and a prefix hit stay exact; a seeded
    sampled request gives what it gives at one device with speculation."""
    monkeypatch.setenv("MESHLM_CHECK_POSITIONS", "1")
    kind = "llama_gqa"
    ps = prompts(10, seed=2)
    one = llm(kind)
    alone = [one.generate([p], GREEDY)[0].token_ids for p in ps]
    block_bytes = 2 * 1 * 16 * 2 * 16 * 4  # K+V x one layer per stage x block x kv heads x head_dim x fp32
    cfg = EngineConfig(kv_cache_mb=16 * block_bytes / 2**20)  # 16 blocks = 256 tokens for 10 requests
    with LLM(str(checkpoint(kind)), pp=2, progress=False, engine=cfg, speculative=ALWAYS) as pp2:
        engine = pp2.engine
        seen = checked_steps(engine)
        steps = engine.steps_done
        ngram, oracle = run_both(pp2, ps)
        assert ngram == alone and oracle == alone
        assert engine.scheduler.num_preemptions > 0 and engine.stats().speculative.accepted > 0
        assert sum(seen) == engine.steps_done - steps  # every step's positions checked on both stages
        assert engine.blocks.num_free == engine.blocks.num_blocks
        stream = pp2.stream(ps[0], GREEDY)
        for _ in range(4):
            next(stream)
        stream.close()  # abort with a step in flight
        assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
        long = ps[1] + alone[1][:20]
        assert pp2.generate([ps[1]], GREEDY)[0].token_ids == alone[1]  # its blocks are now cached
        hits = engine.blocks.stats.prefix_hits
        assert pp2.generate([long], replace(GREEDY, max_tokens=30))[0].token_ids == alone[1][20:50]
        assert engine.blocks.stats.prefix_hits > hits
        sampled = SamplingParams(max_tokens=30, temperature=0.8, top_k=40, seed=3, ignore_eos=True)
        engine.spec.proposer = NgramProposer()
        got = pp2.generate(ps[2], sampled)[0].token_ids
    with LLM(str(checkpoint(kind)), progress=False, speculative=ALWAYS) as solo:
        assert solo.generate(ps[2], sampled)[0].token_ids == got  # same logits, same draws at pp=1 and pp=2


def test_speculative_tp2_x_pp2(checkpoint, llm, monkeypatch):
    """tp=2 inside each of 2 stages (4 ranks): greedy with speculation equals one device; positions checked."""
    monkeypatch.setenv("MESHLM_CHECK_POSITIONS", "1")
    kind = "llama_odd_heads"
    ps = prompts(4, seed=3)
    alone = [llm(kind).generate([p], GREEDY)[0].token_ids for p in ps]
    with LLM(str(checkpoint(kind)), tp=2, pp=2, progress=False, speculative=ALWAYS) as hybrid:
        seen = checked_steps(hybrid.engine)
        ngram, oracle = run_both(hybrid, ps)
        assert ngram == alone and oracle == alone
        assert sum(seen) == hybrid.engine.steps_done
