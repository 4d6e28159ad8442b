"""The engine driving tensor-parallel ranks: batch invariance and preemption at tp=2."""

from __future__ import annotations

import random

import pytest

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def test_batch_invariance_at_tp2(checkpoint, llm):
    """Greedy tokens are the same alone at tp=1 and inside batches of 8 and 32 at tp=2."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(3, 61))] for _ in range(32)]
    alone = [llm("llama_odd_heads").generate([p], GREEDY)[0].token_ids for p in prompts]
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x block x KV heads of rank 0 (2 of 3) x dim x fp32
    with LLM(str(checkpoint("llama_odd_heads")), tp=2, progress=False) as tp2:
        assert [o.token_ids for o in tp2.generate(prompts[:8], GREEDY)] == alone[:8]
        assert [o.token_ids for o in tp2.generate(prompts, GREEDY)] == alone
    cfg = EngineConfig(kv_cache_mb=16 * block_bytes / 2**20)
    with LLM(str(checkpoint("llama_odd_heads")), tp=2, progress=False, engine=cfg) as tight:
        assert tight.engine.blocks.num_blocks == 16  # sized by the rank with the larger KV share
        outs = tight.generate(prompts[:16], GREEDY)
        assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone[:16]
