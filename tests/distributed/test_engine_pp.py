"""The engine driving pipeline stages: one step in flight per stage, results equal to one device."""

from __future__ import annotations

import random

import pytest

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig
from meshlm.parallel.pipeline import PipelineSpec

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KIND = "llama_gqa"
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 3..60 tokens."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(3, 61))] for _ in range(n)]


def sampled_params() -> list[SamplingParams]:
    """Greedy, seeded top-p and top-k sampling, logprobs and an early stop, in one batch."""
    return [GREEDY, SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=9, ignore_eos=True, logprobs=3),
            SamplingParams(max_tokens=24, temperature=1.0, top_k=20, seed=11, ignore_eos=True)]


def deepest(engine) -> list[int]:
    """Record how many steps are in flight after each submit (wraps engine._submit)."""
    seen: list[int] = []
    submit = engine._submit

    def wrapped(plan):
        submit(plan)
        seen.append(len(engine.inflight))

    engine._submit = wrapped
    return seen


class TestTwoStages:
    """Tests sharing one two-stage LLM."""

    @pytest.fixture(scope="class")
    def pp2(self, checkpoint):
        """KIND on two pipeline stages, driven by the engine (closed before the next launch)."""
        with LLM(str(checkpoint(KIND)), pp=2, progress=False) as llm:
            yield llm


    def test_pp2_batch_invariance_with_two_steps_in_flight(self, pp2, llm):
        """Greedy tokens alone on one device equal those inside batches of 8 and 32 at pp=2, where two steps
        (one per stage) are in flight and the running requests split into two groups."""
        prompts = mixed_prompts(32)
        one = llm(KIND)
        alone = [one.generate([p], GREEDY)[0].token_ids for p in prompts]
        seen = deepest(pp2.engine)
        assert [o.token_ids for o in pp2.generate(prompts[:8], GREEDY)] == alone[:8]
        assert [o.token_ids for o in pp2.generate(prompts, GREEDY)] == alone
        assert max(seen) == 2
        assert pp2.engine.blocks.num_free == pp2.engine.blocks.num_blocks


    def test_pp2_sampling_and_logprobs_equal_one_device(self, pp2, llm):
        """Seeded sampling, logprobs and early stops: the same tokens and logprobs as one device."""
        prompts = mixed_prompts(4, seed=5)
        ref = llm(KIND).generate(prompts, sampled_params())
        outs = pp2.generate(prompts, sampled_params())
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        for a, b in zip(outs[2].logprobs, ref[2].logprobs, strict=True):
            assert a.top.keys() == b.top.keys() and a.logprob == pytest.approx(b.logprob, abs=1e-4)


    def test_pp2_stream_and_abort_in_flight(self, pp2, llm):
        """A request aborted while its step is in flight frees its blocks; the others finish exactly."""
        prompts = mixed_prompts(6, seed=9)
        alone = [llm(KIND).generate([p], GREEDY)[0].token_ids for p in prompts]
        engine = pp2.engine
        reqs = [engine.add_request(p, GREEDY) for p in prompts]
        engine.step()
        busy = [r for r in reqs if r.in_flight]
        assert len(engine.inflight) == 1 and busy  # one collected, one still in flight
        victim = busy[0]
        assert engine.abort(victim.id)
        while engine.has_unfinished():
            engine.step()
        for r, want in zip(reqs, alone):
            if r is not victim:
                assert r.out.token_ids == want
        assert victim.out.finish_reason == "abort"
        assert engine.blocks.num_free == engine.blocks.num_blocks
        text = "".join(delta for delta, _ in pp2.stream(prompts[0], GREEDY))
        assert text == pp2.generate([prompts[0]], GREEDY)[0].text
        stopped = pp2.stream(prompts[1], GREEDY)  # a reader that stops with a step in flight
        for _ in range(3):
            next(stopped)
        stopped.close()
        assert not engine.inflight and engine.blocks.num_free == engine.blocks.num_blocks
        reqs = [engine.add_request(p, GREEDY) for p in prompts[:4]]
        engine.step()
        assert engine.inflight
        engine.drain()  # finish what is in flight; the ranks then answer other calls
        assert not engine.inflight and [i["stage"] for i in pp2.rank_info()] == [0, 1]
        while engine.has_unfinished():
            engine.step()
        assert [r.out.token_ids for r in reqs] == alone[:4]


def test_pp2_preemption_recomputes_exactly(checkpoint, llm):
    """With KV blocks for far fewer tokens than the batch needs, every request completes exactly at pp=2."""
    prompts = mixed_prompts(16, seed=3)
    alone = [llm(KIND).generate([p], GREEDY)[0].token_ids for p in prompts]
    block_bytes = 2 * 1 * 16 * 2 * 16 * 4  # K+V x one layer per stage x block x kv heads x head_dim x fp32
    with LLM(str(checkpoint(KIND)), pp=2, progress=False, engine=EngineConfig(kv_cache_mb=12 * block_bytes
                                                                                / 2**20)) as tight:
        assert tight.engine.blocks.num_blocks == 12
        outs = tight.generate(prompts, GREEDY)
        assert tight.engine.scheduler.num_preemptions > 0
        assert tight.engine.blocks.num_free == 12
    assert [o.token_ids for o in outs] == alone


def test_tp2_x_pp2_engine(checkpoint, llm):
    """tp=2 inside each of 2 stages (4 ranks, uneven heads): greedy batches equal one device, with two steps
    in flight (a 150-token prompt in chunks that overlap across stages) and with pipeline_depth=1; every
    rank's timeline adds up."""
    kind = "llama_odd_heads"
    prompts = [*mixed_prompts(7, seed=4), [random.Random(1).randrange(3, 512) for _ in range(150)]]
    alone = [llm(kind).generate([p], GREEDY)[0].token_ids for p in prompts]
    with LLM(str(checkpoint(kind)), tp=2, pp=2, progress=False, pipeline=PipelineSpec(prefill_chunks=4)) as hybrid:
        hybrid.start_timeline(spans=False)
        assert [o.token_ids for o in hybrid.generate(prompts, GREEDY)] == alone
        reports = hybrid.stage_reports()
        assert [r["tp_index"] for r in reports] == [0, 1, 0, 1]
        for rep in reports:
            t = rep["timeline"]["totals"]
            assert abs(t["wall"] - t["compute"] - t["send"] - t["recv"] - t["idle"]) <= 0.05 * t["wall"], t
        hybrid.engine.depth = 1  # what EngineConfig(pipeline_depth=1) sets
        seen = deepest(hybrid.engine)
        assert [o.token_ids for o in hybrid.generate(prompts, GREEDY)] == alone
        assert max(seen) == 1
        assert [i["stage"] for i in hybrid.rank_info()] == [0, 0, 1, 1]  # a call after steps: ranks came back
