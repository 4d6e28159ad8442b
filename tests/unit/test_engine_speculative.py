"""Speculative decoding through the engine at tp=1: exactly the tokens of no speculation, alone and in
batches, with prefix-cache hits, preemption, aborts, stops and logprobs; every position checked."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from helpers import Oracle
from helpers import repeat_prompts as prompts

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig
from meshlm.engine.sampler import target_probs
from meshlm.engine.speculative import Proposal, SpeculativeConfig

KIND = "llama_gqa"
GREEDY = SamplingParams(max_tokens=64, ignore_eos=True)
ALWAYS = SpeculativeConfig("ngram", num_tokens=4, adaptive=False)  # propose every step: test every path


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy outputs of 12 prompts without speculation, one at a time."""
    base = llm(KIND)
    ps = prompts(12)
    return ps, [base.generate([p], GREEDY)[0] for p in ps]


@pytest.fixture(scope="module")
def spec(checkpoint, monkeypatch_module):
    """KIND with n-gram speculation always on, and the position ledger checked whenever the engine idles."""
    monkeypatch_module.setenv("MESHLM_CHECK_POSITIONS", "1")
    with LLM(str(checkpoint(KIND)), progress=False, speculative=ALWAYS) as llm:
        yield llm


@pytest.fixture(scope="module")
def monkeypatch_module():
    """A module-scoped monkeypatch."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def with_proposer(llm, proposer):
    """Swap the engine's proposer (driver side only)."""
    llm.engine.spec.proposer = proposer
    return llm


@pytest.mark.parametrize("proposer", ["ngram", "oracle"])
def test_greedy_equals_no_speculation_alone_and_batched(spec, reference, proposer):
    """64 greedy tokens each, one at a time and 12 at once: identical to no speculation; proposals accepted."""
    ps, ref = reference
    from meshlm.engine.speculative import NgramProposer

    with_proposer(spec, NgramProposer() if proposer == "ngram" else Oracle(dict(zip(map(tuple, ps), (
        r.token_ids for r in ref)))))
    before = spec.engine.stats().speculative.accepted
    alone = [spec.generate([p], GREEDY)[0].token_ids for p in ps[:4]]
    batch = [o.token_ids for o in spec.generate(ps, GREEDY)]
    assert alone == [r.token_ids for r in ref[:4]]
    assert batch == [r.token_ids for r in ref]
    assert spec.engine.stats().speculative.accepted > before
    assert spec.engine.blocks.num_free == spec.engine.blocks.num_blocks


def test_stops_max_tokens_and_logprobs_inside_accepted_runs(spec, llm, reference):
    """Stop ids, stop strings and max_tokens that fall inside a run of accepted tokens end the request there;
    logprobs come for every emitted token and equal no speculation's."""
    ps, ref = reference
    refs = dict(zip(map(tuple, ps), (r.token_ids for r in ref)))
    with_proposer(spec, Oracle(refs))
    tok = spec.tokenizer
    params = [replace(GREEDY, max_tokens=13), replace(GREEDY, stop_token_ids=(ref[1].token_ids[10],)),
              replace(GREEDY, ignore_eos=True, stop=(tok.decode(ref[2].token_ids[7:9]),)),
              replace(GREEDY, max_tokens=20, logprobs=3)]
    got = spec.generate(ps[:4], params)
    want = llm(KIND).generate(ps[:4], params)
    for g, w in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    assert len(got[0].token_ids) == 13
    assert [t.token_id for t in got[3].logprobs] == got[3].token_ids
    for a, b in zip(got[3].logprobs, want[3].logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.top.keys() == b.top.keys()


def test_prefix_cache_hits_and_seeded_sampling(spec, reference):
    """A repeated prompt reuses cached blocks (hashes of accepted tokens only) and decodes the same tokens;
    a seeded sampled request reproduces with speculation on."""
    ps, ref = reference
    with_proposer(spec, Oracle(dict(zip(map(tuple, ps), (r.token_ids for r in ref)))))
    blocks = spec.engine.blocks
    long = ps[0] + ref[0].token_ids[:40]  # a prompt whose blocks the first run computed and registered
    first = spec.generate([ps[0]], GREEDY)[0]
    hits = blocks.stats.prefix_hits
    second = spec.generate([long], replace(GREEDY, max_tokens=16))[0]
    assert blocks.stats.prefix_hits > hits and second.num_cached_tokens > 0
    assert second.token_ids == first.token_ids[40:56]
    sampled = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    from meshlm.engine.speculative import NgramProposer

    with_proposer(spec, NgramProposer())
    a, b = (spec.generate([ps[3]], sampled)[0].token_ids for _ in range(2))
    assert a == b and len(a) == 40


def test_preemption_and_abort_mid_speculation(checkpoint, reference, monkeypatch):
    """A pool far smaller than the batch preempts requests between speculative steps: outputs stay exact,
    released proposals are forgotten and every block comes back; an abort mid-stream frees everything."""
    ps, ref = reference
    monkeypatch.setenv("MESHLM_CHECK_POSITIONS", "1")
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x block x kv heads x head_dim x fp32
    cfg = EngineConfig(kv_cache_mb=14 * block_bytes / 2**20)  # 14 blocks = 224 tokens for 12 requests
    with LLM(str(checkpoint(KIND)), progress=False, engine=cfg, speculative=ALWAYS) as tight:
        oracle = with_proposer(tight, Oracle(dict(zip(map(tuple, ps), (r.token_ids for r in ref))))).engine.spec
        outs = tight.generate(ps, GREEDY)
        assert tight.engine.scheduler.num_preemptions > 0
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
        assert tight.engine.blocks.num_free == 14
        assert len(oracle.proposer.released) >= len(ps) + tight.engine.scheduler.num_preemptions
        stream = tight.stream(ps[0], GREEDY)
        for _ in range(5):
            next(stream)
        stream.close()  # aborts the request mid-stream
        assert not tight.engine.has_unfinished() and tight.engine.blocks.num_free == 14
        assert tight.generate([ps[1]], GREEDY)[0].token_ids == ref[1].token_ids


def test_position_check_catches_a_disagreement(spec, reference):
    """The debug ledger check fails when a request's next step would not start where its accepted tokens end."""
    ps, ref = reference
    with_proposer(spec, Oracle(dict(zip(map(tuple, ps), (r.token_ids for r in ref)))))
    engine = spec.engine
    req = engine.add_request(ps[0], GREEDY)
    for _ in range(4):
        engine.step()
    engine.ledger.computed_after[1][req.id] += 1  # as if one stage had kept a rejected proposal's KV
    with pytest.raises(AssertionError, match="accepted tokens end"):
        engine.check_positions()
    engine.ledger.steps.clear()
    engine.ledger.computed_after.clear()
    engine.abort(req.id)
    assert not engine.has_unfinished()


class Sampler:
    """Draws proposals from q = the target's own next-token distribution at another temperature and top-k (so
    q overlaps p but differs from it: acceptance and the residual draw both matter), and returns q with them."""

    name = "fixed-q"

    def __init__(self, llm) -> None:
        self.llm, self.g = llm, torch.Generator().manual_seed(99)
        self.qs: dict[tuple[int, ...], torch.Tensor] = {}  # context -> q [V]

    def propose(self, reqs, ks):
        """Proposal of ks[i] (here 1) tokens drawn from q, with q as their probs."""
        out = []
        for r, k in zip(reqs, ks):
            key = tuple(r.tokens)
            if key not in self.qs:
                self.qs[key] = target_probs(self.llm.logits([r.tokens])[0, -1], SamplingParams(temperature=1.6,
                                                                                              top_k=10))
            q = self.qs[key]  # [V]
            x = torch.multinomial(q, k, replacement=True, generator=self.g)
            out.append(Proposal(tuple(x.tolist()), q.expand(k, -1).clone()))
        return out

    def backlog(self, req):
        """Nothing to catch up on."""
        return 0

    def release(self, request_id):
        """Nothing kept."""


@pytest.mark.slow
def test_sampled_tokens_follow_the_target_through_the_engine(spec):
    """End to end with a draft distribution q (the probs path a draft model takes): 3000 seeded requests propose
    for their second token; grouped by the first token, the second token's frequencies match the target's
    p(. | prompt, first) after temperature and top-k."""
    vocab = spec.cfg.vocab_size
    with_proposer(spec, Sampler(spec))
    prompt = [5, 17, 300, 42, 9]
    n = 3000
    params = [SamplingParams(max_tokens=3, temperature=0.8, top_k=6, seed=i, ignore_eos=True) for i in range(n)]
    before = spec.engine.stats().speculative.drafts
    outs = [o for i in range(0, n, 1000) for o in spec.generate([prompt] * 1000, params[i:i + 1000])]
    assert spec.engine.stats().speculative.drafts - before == n  # every second token went through verification
    firsts = Counter(o.token_ids[0] for o in outs)
    first, count = firsts.most_common(1)[0]
    seconds = torch.bincount(torch.tensor([o.token_ids[1] for o in outs if o.token_ids[0] == first]),
                             minlength=vocab).float()
    p = target_probs(spec.logits([prompt + [first]])[0, -1], params[0])
    assert count > 500 and seconds[p == 0].sum() == 0  # never a token top-k excludes
    assert 0.5 * float((seconds / seconds.sum() - p).abs().sum()) < 0.06


def test_seeded_sampling_reproduces_whatever_k_the_policy_would_pick(checkpoint, reference):
    """With the adaptive policy, a seeded sampled request gives the same tokens whether the (injected) costs make
    the policy speculate (flat step cost) or not (cost proportional to tokens): it proposes the configured k
    either way; a greedy request follows the policy (proposals under the flat cost only)."""
    ps, _ = reference
    seeded = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    runs, proposed = [], []
    with LLM(str(checkpoint(KIND)), progress=False, speculative=SpeculativeConfig("ngram", 4)) as llm:
        pol = llm.engine.spec.policy
        pol.observe_step(1, 0.01)  # two step sizes measured: the policy decides from here on
        pol.observe_step(5, 0.01)
        pol.observe_propose(4, 0.0)  # and a proposer call
        pol.proposer_cost = lambda: (0.0, 0.0)
        for costs in [(0.01, 0.0), (0.0, 1.0), (0.01, 0.0)]:  # (a, b) of step seconds = a + b * tokens
            pol.cost = lambda costs=costs: costs
            c = llm.engine.stats().speculative
            llm.generate([ps[1]], GREEDY)
            mid = llm.engine.stats().speculative
            runs.append(llm.generate([ps[3]], seeded)[0].token_ids)
            end = llm.engine.stats().speculative
            proposed.append((mid.proposed - c.proposed, end.proposed - mid.proposed))
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 40
    assert proposed[0][0] > 0 and proposed[1][0] == 0  # greedy: the policy's choice
    assert all(seed > 0 for _, seed in proposed)  # seeded sampled: the configured k under either cost


@pytest.mark.slow
def test_bundled_model_quantized_greedy_is_bit_exact(smollm2_q):
    """The bundled SmolLM2 as `meshlm generate` runs it (Q4_1/Q8_0, int8-rounded activations, which amplify any
    difference in summation order): greedy with n-gram speculation equals greedy without for 80 tokens of an
    input-grounded task, proposals accepted (verification rows take the decode path: engine/paged_attention)."""
    text = open(__import__("meshlm").__path__[0] + "/data/alice.txt").read()[:1200]
    ids = smollm2_q.encode_prompt([{"role": "user", "content": "Copy this text exactly:\n\n" + text}])
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    want = smollm2_q.generate([ids], params)[0].token_ids
    with LLM(None, progress=False, speculative=ALWAYS) as spec_q:
        got = spec_q.generate([ids], params)[0].token_ids
        assert spec_q.engine.stats().speculative.accepted > 10
    assert got == want


def test_sliding_window_model(checkpoint, llm):
    """An 8-token sliding window (Mistral): each verified row sees only its own window; outputs stay exact."""
    kind = "mistral_window"
    ps = prompts(3, seed=5)
    want = [llm(kind).generate([p], GREEDY)[0].token_ids for p in ps]
    with LLM(str(checkpoint(kind)), progress=False, speculative=ALWAYS) as spec_w:
        with_proposer(spec_w, Oracle(dict(zip(map(tuple, ps), want))))
        assert [o.token_ids for o in spec_w.generate(ps, GREEDY)] == want
        assert spec_w.engine.stats().speculative.accepted > 0
