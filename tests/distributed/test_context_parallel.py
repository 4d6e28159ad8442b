"""Context parallelism end to end: cp=2 and cp=4 ranks give cp=1's greedy tokens and logits (and
transformers'), through pass-KV, pass-Q and the automatic choice, chunked prefill and prefix-cache hits."""

from __future__ import annotations

import random

import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig
from meshlm.engine.paged_attention import SeqInput, StepInput
from meshlm.engine.scheduler import SchedulerConfig
from meshlm.errors import RequestError

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GREEDY = SamplingParams(max_tokens=64, ignore_eos=True, logprobs=0)
# 1: one new token (computed on every rank); 2, 3, 5: shorter than the 2N chunks; the rest divide unevenly.
LENGTHS = (1, 2, 3, 5, 17, 40, 61, 100)


def prompts(seed: int, lengths=LENGTHS) -> list[list[int]]:
    """Random prompts of the given lengths (token ids of the test vocabulary)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def logprobs(out) -> torch.Tensor:
    """The chosen tokens' log-probabilities of one output."""
    return torch.tensor([t.logprob for t in out.logprobs])


def assert_same(got, want, atol: float = 1e-4) -> None:
    """Same greedy tokens, chosen-token log-probabilities within atol."""
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(logprobs(g), logprobs(w), atol=atol, rtol=0)


def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of `tokens` generated after `prompt`."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return lp[len(prompt) - 1:].gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_cp2_rings_prefix_cache_and_transformers(checkpoint, llm, reference):
    """cp=2: pass-KV, pass-Q and auto on fresh prompts, then the same prompts again (a prefix hit), all equal to
    cp=1; the logits match transformers."""
    kind = "llama_gqa"
    sets = {ring: prompts(i) for i, ring in enumerate(("pass-kv", "pass-q", "auto"))}
    base = {ring: llm(kind).generate(ps, GREEDY) for ring, ps in sets.items()}
    with LLM(str(checkpoint(kind)), cp=2, progress=False) as two:
        for ring, ps in sets.items():
            two.executor.call("set_cp_ring", ring)
            outs = two.generate(ps, GREEDY)
            assert_same(outs, base[ring])
            assert all(o.num_cached_tokens == 0 for o in outs)
        two.executor.call("set_cp_ring", "pass-q")
        again = two.generate(sets["pass-kv"], GREEDY)  # prompts whose first 32-token blocks are cached
        assert [o.num_cached_tokens for o in again] == [0] * 5 + [32, 32, 96]
        assert_same(again, base["pass-kv"])
        choices = two.executor.call_all("cp_ring_choices")
        assert two.engine.stats().cp_ring_choices == choices[0]  # exported as meshlm_cp_ring_choices_total
        # A sequence with several sampled rows (a speculative verification) is computed on every rank.
        table: list[int] = []
        assert two.engine.blocks.allocate(table, [], 40)
        (toks,) = prompts(40, (40,))
        step = StepInput(tuple(toks), (SeqInput(0, 0, 40, tuple(table)),), tuple(range(30, 40)))
        verified = two.executor.call("execute", step).best
        two.engine.blocks.release(table)
    assert choices[0] == choices[1] and set(choices[0]) == {"pass-kv", "pass-q"}
    model = reference(kind)
    with torch.no_grad():
        assert verified == model(torch.tensor([toks])).logits[0, 30:40].argmax(-1).tolist()
    for p, o in zip(sets["pass-kv"], again):
        torch.testing.assert_close(logprobs(o), hf_logprobs(model, p, o.token_ids), atol=2e-4, rtol=0)


def test_cp2_sliding_window(checkpoint, llm):
    """Mistral's 8-token window: prompts and generations far past it, each ring, equal to cp=1."""
    kind = "mistral_window"
    sets = {ring: prompts(40 + i, (5, 30, 61)) for i, ring in enumerate(("pass-kv", "pass-q"))}
    with LLM(str(checkpoint(kind)), cp=2, progress=False) as two:
        for ring, ps in sets.items():
            two.executor.call("set_cp_ring", ring)
            assert_same(two.generate(ps, GREEDY), llm(kind).generate(ps, GREEDY))


def test_cp4_chunked_prefill_both_rings(checkpoint, llm):
    """cp=4 (odd head counts), prompts cut into 24-token chunks so later chunks ring over a cached context."""
    kind = "llama_odd_heads"
    engine = EngineConfig(scheduler=SchedulerConfig(max_num_batched_tokens=24))
    sets = {ring: prompts(10 + i, (2, 7, 9, 61, 100)) for i, ring in enumerate(("pass-kv", "pass-q"))}
    with LLM(str(checkpoint(kind)), cp=4, progress=False, engine=engine) as four:
        for ring, ps in sets.items():
            four.executor.call("set_cp_ring", ring)
            assert_same(four.generate(ps, GREEDY), llm(kind).generate(ps, GREEDY))


def test_cp2_tp2(checkpoint, llm):
    """cp=2 x tp=2 (4 ranks): each cp rank's heads split over 2 tp ranks; chunked prefill, automatic ring."""
    kind = "llama_gqa"
    ps = prompts(20, (3, 40, 61))
    engine = EngineConfig(scheduler=SchedulerConfig(max_num_batched_tokens=32))
    with LLM(str(checkpoint(kind)), cp=2, tp=2, progress=False, engine=engine) as both:
        assert [i["kv_heads"] for i in both.rank_info()] == [1, 1, 1, 1]
        assert_same(both.generate(ps, GREEDY), llm(kind).generate(ps, GREEDY))


def test_prompt_refused_at_cp1_is_served_at_cp2(checkpoint, llm):
    """The same per-rank KV budget holds 128 tokens at cp=1 and 256 at cp=2: a 150-token prompt fits only there."""
    kind = "llama_gqa"
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x block x KV heads x dim x fp32
    engine = EngineConfig(kv_cache_mb=8 * block_bytes / 2**20)
    (p,) = prompts(30, (150,))
    with LLM(str(checkpoint(kind)), progress=False, engine=engine) as one:
        with pytest.raises(RequestError, match="needs 214 tokens of KV cache but the whole pool holds 128"):
            one.generate([p], GREEDY)
    with LLM(str(checkpoint(kind)), cp=2, progress=False, engine=engine) as two:
        assert two.engine.capacity_tokens == 256
        assert_same(two.generate([p], GREEDY), llm(kind).generate([p], GREEDY))


def test_rank_killed_during_the_ring(tmp_path):
    """kill -9 of cp rank 1 during a long prefill's ring: the launch fails within seconds, naming rank 1."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import _write_tokenizer
    from test_faults import alive, children, meshlm_cmd
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    _write_tokenizer(tmp_path, 512)
    prompt = " ".join(f"w{3 + i % 500}." for i in range(8000))
    proc = subprocess.Popen(meshlm_cmd("-v", "generate", prompt, "--model", str(tmp_path), "--cp", "2",
                                       "--cp-ring", "pass-kv", "--max-tokens", "1", "--comm-timeout", "20"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        seen = ""
        while time.time() < deadline and "over 2048 cached" not in seen:  # the second 2048-token chunk's ring
            seen += proc.stderr.readline()
        assert "pass-kv" in seen, seen
        ranks = [k for k in children(proc.pid)
                 if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="ignore")]
        assert len(ranks) == 1
        time.sleep(0.5)
        t0 = time.time()
        os.kill(ranks[0], signal.SIGKILL)
        code = proc.wait(timeout=40)
        elapsed = time.time() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0
    assert "generated" not in err  # it never finished the prompt
    assert elapsed < 25, f"{elapsed:.1f}s to notice the dead rank"
    assert "rank 1" in err, err
    assert "Traceback" not in err, err
    assert not alive(ranks[0])


def test_cp2_with_speculative_decoding(checkpoint, llm):
    """n-gram speculation at cp=2: verification steps (several sampled rows per sequence) are computed on every
    rank, drafts are proposed and some accepted, and the tokens stay cp=1's."""
    kind = "llama_gqa"
    rng = random.Random(1)
    loop = [rng.randrange(3, 500) for _ in range(12)]
    ps = [loop * 4, prompts(50, (37,))[0]]  # a repetitive prompt gives the n-gram proposer drafts
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    with LLM(str(checkpoint(kind)), cp=2, progress=False, speculative="ngram") as two:
        got = [o.token_ids for o in two.generate(ps, sp)]
        spec = two.engine.stats().speculative
    assert spec is not None and spec.proposed > 0
    assert got == [o.token_ids for o in llm(kind).generate(ps, sp)]


def test_cp2_pp2_rings_prefix_cache_and_transformers(checkpoint, llm, reference):
    """cp=2 x pp=2 (4 ranks): each stage's cp ranks ring over its layer's KV and hand their shard's hidden states to
    the next stage's matching cp rank; pass-KV and pass-Q, chunked prefill, then a prefix hit; equal to cp=1 and
    to transformers."""
    kind = "llama_gqa"
    sets = {ring: prompts(60 + i, (2, 5, 40, 61)) for i, ring in enumerate(("pass-kv", "pass-q"))}
    engine = EngineConfig(scheduler=SchedulerConfig(max_num_batched_tokens=48))
    base = {ring: llm(kind).generate(ps, GREEDY) for ring, ps in sets.items()}
    again = {}
    with LLM(str(checkpoint(kind)), cp=2, pp=2, progress=False, engine=engine) as both:
        assert [i["stage"] for i in both.rank_info()] == [0, 0, 1, 1]
        for ring, ps in sets.items():
            both.executor.call("set_cp_ring", ring)
            assert_same(both.generate(ps, GREEDY), base[ring])
        for ring, other in (("pass-q", "pass-kv"), ("pass-kv", "pass-q")):  # each ring over the other's cached blocks
            both.executor.call("set_cp_ring", ring)
            again[other] = both.generate(sets[other], GREEDY)
            assert [o.num_cached_tokens for o in again[other]] == [0, 0, 32, 32]
            assert_same(again[other], base[other])
        choices = both.executor.call_all("cp_ring_choices")
    assert choices[0] == choices[2] and set(choices[0]) == {"pass-kv", "pass-q"}  # stage 1 rang as stage 0 did
    model = reference(kind)
    for ring, outs in again.items():
        for p, o in zip(sets[ring], outs):
            torch.testing.assert_close(logprobs(o), hf_logprobs(model, p, o.token_ids), atol=2e-4, rtol=0)
