"""Speculative decoding without ranks: rejection sampling keeps the target distribution, greedy verification,
the n-gram lookup, block truncation, the scheduler's draft grants, the policy and the config's errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import CatchUpProposer, FakeClock, decoding_request

from meshlm.config import SamplingParams
from meshlm.engine import sampler
from meshlm.engine.kv_cache import BlockManager
from meshlm.engine.request import Request
from meshlm.engine.sampler import ACCEPT, DRAFT, RESIDUAL, SAMPLE, mix_seed, position_generator, sample, uniform
from meshlm.engine.scheduler import Scheduled, Scheduler, SchedulerConfig
from meshlm.engine.spec_engine import Speculator
from meshlm.engine.spec_policy import MARGIN, PROBE_EVERY, SpecCounters, SpecPolicy
from meshlm.engine.speculative import NgramProposer, SpeculativeConfig
from meshlm.engine.verify import accept_or_resample, verify, verify_greedy, verify_sampled
from meshlm.errors import ConfigError

V = 8
N = 200_000  # trials per distribution check
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0])
PARAMS = {"temperature": SamplingParams(temperature=0.7),
          "top-k": SamplingParams(temperature=1.0, top_k=4),
          "top-p": SamplingParams(temperature=1.3, top_p=0.8)}


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Total-variation distance between empirical counts and p."""
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def chi2_ok(counts: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson chi-square over p's support below the 0.999 quantile for its degrees of freedom (<= 7)."""
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    n = counts.sum()
    stat = float((((counts - n * p) ** 2)[support] / (n * p[support])).sum())
    return stat < {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}[int(support.sum()) - 1]


@pytest.mark.parametrize("kind", list(PARAMS))
@pytest.mark.parametrize("proposer", ["one-hot", "draft"])
def test_rejection_sampling_preserves_the_target_distribution(kind, proposer):
    """The first emitted token of N independent verifications is distributed as the target's p (after
    temperature / top-k / top-p), whether the proposal was drawn from a draft q or is a fixed token."""
    g = torch.Generator().manual_seed(1234)
    p = sampler.target_probs(LOGITS, PARAMS[kind])  # [V]
    if proposer == "draft":
        q = torch.softmax(torch.tensor([0.0, 2.0, 0.5, 1.0, -1.0, 0.0, 1.5, -2.0]), -1)  # unlike p
        x = torch.multinomial(q, N, replacement=True, generator=g)
        qs = q.expand(N, V)
    else:
        x, qs = torch.full((N,), 1, dtype=torch.long), None  # always propose token 1
    accepted, residual = accept_or_resample(p.expand(N, V), x, qs, torch.rand(N, generator=g))
    replacement = torch.multinomial(residual, 1, generator=g)[:, 0]
    emitted = torch.where(accepted, x, replacement)
    counts = torch.bincount(emitted, minlength=V).float()
    assert tv(counts, p) < 0.01
    assert chi2_ok(counts, p)


def test_verify_sampled_two_positions_joint_distribution():
    """Over two proposed positions the emitted (first, second) pairs follow p1(a) * p2(b | a): the second row
    is only used after the first proposal is accepted (20k runs of the engine's own function, seeds 0..19999)."""
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS.roll(3)])  # [3, V]: rows after t, d1, d2
    p = sampler.target_probs(logits, SamplingParams(temperature=1.0))
    draft = (7, 0)  # likely under p[0], p[1]: both paths (accept, reject) are taken often
    firsts = torch.zeros(V)
    seconds_after_accept = torch.zeros(V)
    for seed in range(20_000):
        out = verify_sampled(logits, SamplingParams(temperature=1.0, seed=seed), draft, None, 11)
        firsts[out[0]] += 1
        if out[0] == draft[0]:
            seconds_after_accept[out[1]] += 1
    assert tv(firsts, p[0]) < 0.02
    assert tv(seconds_after_accept, p[1]) < 0.03


def test_seeded_verification_reproduces_and_is_keyed_by_position():
    """The same seed and position give the same tokens, whatever was drawn before; without a draft,
    verification is the plain sampler's draw at that position, and the bonus after k acceptances is too."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3)
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    runs = [[verify(params, (1, 2, 3, 4), None, [0] * 5, logits, 40 + i) for i in range(5)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1  # positions draw differently
    torch.rand(7)  # the global RNG moves: keyed draws don't
    assert [verify(params, (1, 2, 3, 4), None, [0] * 5, logits, 40 + i) for i in range(5)] == runs[0]
    plain = verify(params, (), None, [0], logits[4:], 44)
    assert plain == [sample(logits[4], params, position_generator(3, 44, SAMPLE))]
    sure = sampler.target_probs(logits, params).argmax(-1).tolist()  # a draft the target accepts with certainty
    certain = logits.clone()
    certain[torch.arange(4), torch.tensor(sure[:4])] = 1e4
    assert verify(params, tuple(sure[:4]), None, [0] * 5, certain, 40) == [*sure[:4], plain[0]]


def test_keyed_seeds_differ_by_seed_position_and_purpose():
    """mix_seed separates (seed, position, purpose) triples and is a pure function of them."""
    keys = {mix_seed(s, t, k) for s in (0, 1, 2**63 - 1, -5) for t in range(64) for k in (SAMPLE, ACCEPT, RESIDUAL,
                                                                                            DRAFT)}
    assert len(keys) == 4 * 64 * 4 and all(0 <= x < 2**63 for x in keys)
    assert mix_seed(9, 3, SAMPLE) == mix_seed(9, 3, SAMPLE) and mix_seed(9, 3, SAMPLE) != mix_seed(3, 9, SAMPLE)
    assert uniform(9, 3, ACCEPT) == uniform(9, 3, ACCEPT) != uniform(9, 4, ACCEPT)


def test_verify_greedy_takes_the_matching_prefix_and_the_targets_next():
    """Greedy: accept while the draft equals the argmax; then the target's own token (correction or bonus)."""
    assert verify_greedy((5, 6, 7), [5, 6, 9, 1]) == [5, 6, 9]
    assert verify_greedy((5, 6, 7), [5, 6, 7, 1]) == [5, 6, 7, 1]
    assert verify_greedy((4,), [5, 6]) == [5]
    assert verify_greedy((), [5]) == [5]


def test_ngram_prefers_the_longest_then_latest_match():
    """Prompt lookup: the longest suffix n-gram wins over a later shorter one; among equals the latest."""
    ng = NgramProposer(1, 4)
    assert ng.lookup([1, 2, 3, 9, 9, 5, 3, 8, 1, 2, 3], 3) == (9, 9, 5)  # "1 2 3" beats the later "3 8"
    assert ng.lookup([4, 7, 1, 4, 8, 2, 4], 2) == (8, 2)  # "4" twice: the latest
    assert ng.lookup([1, 2, 3], 2) == ()
    assert ng.lookup([5, 6, 5], 4) == (6, 5)  # stops at the end of the known tokens
    assert NgramProposer(2, 4).lookup([4, 7, 1, 4], 2) == ()  # a 1-gram match is below n_min


def test_truncate_frees_whole_blocks_past_the_end_first_in_line():
    """truncate keeps blocks up to num_tokens slots; the freed ones are handed out before cached blocks."""
    bm = BlockManager(6, 4)
    table: list[int] = []
    assert bm.allocate(table, [], 14)  # 4 blocks
    bm.truncate(table, 5)
    assert len(table) == 2 and bm.num_free == 4
    freed = bm._take()
    assert freed in (2, 3)  # a truncated block, not block 4 or 5 (still at the free list's back)


def test_scheduler_grants_drafts_under_the_budget_and_rolls_back():
    """A decoding request's draft counts under the token budget; computed(accepted) trims its blocks."""
    bm = BlockManager(16, 2)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=4), bm)
    req = Request("a", [3, 4, 5], SamplingParams(max_tokens=20), max_new=20)
    s.add(req)
    s.computed(s.schedule().items[0])
    req.tokens.append(9)  # the first sampled token
    req.draft = (1, 2, 3, 4, 5)
    item = s.schedule().items[0]
    assert (item.start, item.num_new, item.draft) == (3, 1, (1, 2, 3))  # 1 + 3 proposals = the budget of 4
    assert req.draft == () and len(req.block_table) == 4  # slots for positions 0..6
    req.tokens += [1, 7]  # one proposal accepted, then the target's own token
    s.computed(item, accepted=1)
    assert (req.num_computed, req.num_scheduled, len(req.block_table)) == (5, 5, 3)


def policy(step: tuple[float, float], proposer: tuple[float, float] = (0.0, 0.0), k_max: int = 4) -> SpecPolicy:
    """A policy whose measured costs are injected: step seconds = a + b*T and proposer seconds = c + d*n, each
    from exact samples at several sizes."""
    pol = SpecPolicy(k_max)
    for t in (1, 5, 1, 5, 9, 1):
        pol.observe_step(t, step[0] + step[1] * t)
        pol.observe_propose(t, proposer[0] + proposer[1] * t)
    return pol


def accept(pol: SpecPolicy, rid: str, rate: float, n: int = 40) -> None:
    """n verifications of 4 proposals for request rid, each position accepted with probability about `rate`."""
    for i in range(n):
        kept = 0
        while kept < 4 and (i * 7 + kept * 3) % 10 < rate * 10:
            kept += 1
        pol.observe_verify(rid, 4, kept)


def test_policy_fits_the_injected_costs():
    """The fits recover the step's and the proposer's (a, b) from their own samples."""
    pol = policy((0.010, 0.0002), (0.0005, 0.003))
    assert pol.cost() == pytest.approx((0.010, 0.0002))
    assert pol.proposer_cost() == pytest.approx((0.0005, 0.003))
    one = SpecPolicy(4)
    one.observe_propose(4, 0.008)  # one call size only: all of its cost is per proposed token
    assert one.proposer_cost() == pytest.approx((0.0, 0.002))


def test_policy_speculates_when_steps_cost_the_same_and_stops_when_tokens_cost():
    """Flat step cost (weight-bound): propose k_max; cost proportional to tokens at batch 64: don't speculate,
    and don't probe either (a sure acceptance would not pay)."""
    flat, linear = policy((0.010, 0.0)), policy((0.0, 0.001))
    for pol in (flat, linear):
        accept(pol, "r", 0.7)
    assert flat.choose(["r"], [4], [False]) == [4]
    ids = [f"b{i}" for i in range(64)]
    for _ in range(40):  # past any probe
        assert linear.choose(ids, [4] * 64, [False] * 64) == [0] * 64


def test_policy_charges_the_proposers_cost():
    """With the same flat target step and acceptance, a free proposer gets k_max, one costing a target step per
    proposed token gets none; one in between gets a shorter k."""
    free, dear, mid = policy((0.010, 0.0)), policy((0.010, 0.0), (0.0, 0.010)), policy((0.010, 0.0), (0.0, 0.004))
    for pol in (free, dear, mid):
        accept(pol, "r", 0.6)
    assert free.choose(["r"], [4], [False]) == [4]
    assert dear.choose(["r"], [4], [False]) == [0]
    assert 0 < mid.choose(["r"], [4], [False])[0] < 4
    a = mid.alphas("r")  # the choice maximises tokens per second over k
    rates = [mid.expected_tokens(k, "r") / (0.010 + (0.004 * k if k else 0)) for k in range(5)]
    assert mid.choose(["r"], [4], [False])[0] == max(range(5), key=rates.__getitem__), a


def test_policy_tracks_acceptance_per_request():
    """A chat request with low acceptance does not keep a grounded one from speculating in the same batch; a new
    request starts from the engine-wide estimate, and once no request proposed for PROBE_EVERY steps one probes."""
    pol = policy((0.010, 0.0), (0.0, 0.001))
    accept(pol, "chat", 0.0)
    accept(pol, "grounded", 1.0, n=10)
    assert pol.choose(["chat", "grounded"], [4, 4], [False, False]) == [0, 4]
    accept(pol, "chat", 0.0, n=200)  # the engine-wide estimate is now low
    ks = [pol.choose(["new"], [4], [False]) for _ in range(PROBE_EVERY + 1)]
    assert ks == [[0]] * PROBE_EVERY + [[4]]  # a probe after PROBE_EVERY steps without proposals
    accept(pol, "new", 1.0, n=10)
    assert pol.choose(["new", "chat"], [4, 4], [False, False]) == [4, 0]
    pol.release("new")
    assert "new" not in pol.reqs


def test_policy_fixed_requests_keep_their_k_and_count_in_the_cost():
    """A fixed request (seeded sampled) proposes its cap even where the policy would not speculate."""
    linear = policy((0.0, 0.001))
    ids = [f"b{i}" for i in range(8)]
    chosen = [linear.choose(ids, [3] * 8, [True] + [False] * 7) for _ in range(3 * PROBE_EVERY)]
    assert all(ks[0] == 3 for ks in chosen)
    probes = [ks[1:] for ks in chosen if any(ks[1:])]  # the others: a probe of one request per PROBE_EVERY steps
    assert len(probes) <= 3 and all(sorted(ks) == [0] * 6 + [3] for ks in probes)


def predicted_rate(pol: SpecPolicy, ids: list[str], ks: list[int]) -> float:
    """Tokens per second the cost model predicts for a decode step with proposals ks (the policy's formula)."""
    (a, b), (c, d) = pol.cost(), pol.proposer_cost()
    k = sum(ks)
    return sum(pol.expected_tokens(n, r) for n, r in zip(ks, ids)) / (a + b * (len(ids) + k) + (c + d * k if k else 0))


@pytest.mark.parametrize("step,prop,rates", [((0.010, 0.0025), (0.0, 0.0), (0.6, 0.9)),  # CPU-like rows
                                             ((0.020, 0.0005), (0.0005, 0.002), (0.3, 0.8)),  # a dear proposer
                                             ((0.010, 0.0), (0.0, 0.0), (0.5, 0.1))])  # flat: always pays
def test_policy_picks_the_batchs_best_predicted_goodput(step, prop, rates):
    """For a small batch, the chosen k's give the most tokens per second the cost model predicts among every
    combination (within MARGIN of no speculation: then none), checked by enumeration."""
    import itertools

    pol = policy(step, prop, k_max=3)
    ids = ["r0", "r1"]
    for rid, rate in zip(ids, rates):
        accept(pol, rid, rate)
    ks = pol.choose(ids, [3, 3], [False, False])
    rates_all = {combo: predicted_rate(pol, ids, list(combo)) for combo in itertools.product(range(4), repeat=2)}
    best = max(rates_all, key=rates_all.__getitem__)
    if rates_all[best] > rates_all[(0, 0)] * (1 + MARGIN):
        assert predicted_rate(pol, ids, ks) == pytest.approx(rates_all[best], rel=1e-9), (ks, best)
    else:
        assert ks == [0, 0]


def test_policy_batch_where_speculation_predicts_less_gets_none_and_batch_one_speculates():
    """Compute-bound CPU step (a = 10 ms, b = 2 ms a row): at 16 requests with 60% acceptance a proposal costs
    more than it gains (predicted goodput lower), so k = 0 for all, past any probe's cost; the same policy at
    batch 1 proposes."""
    pol = policy((0.010, 0.002))
    ids = [f"b{i}" for i in range(16)]
    for rid in ids + ["one"]:
        accept(pol, rid, 0.6)
    assert predicted_rate(pol, ids, [4] * 16) < predicted_rate(pol, ids, [0] * 16)
    chosen = [pol.choose(ids, [4] * 16, [False] * 16) for _ in range(4 * PROBE_EVERY)]
    probes = [ks for ks in chosen if any(ks)]
    assert len(probes) <= 4 and all(sorted(ks) == [0] * 15 + [4] for ks in probes)  # one request per 16 steps
    assert predicted_rate(pol, ["one"], [4]) > predicted_rate(pol, ["one"], [0])
    assert pol.choose(["one"], [4], [False])[0] > 0


def test_policy_learns_the_row_cost_before_speculating():
    """A new engine's first decode step proposes nothing, the next one request's cap (a second step size), and
    only then does the fit decide; a batch where the rows cost gets none from there on."""
    pol = SpecPolicy(4)
    ids = [f"b{i}" for i in range(16)]
    assert pol.choose(ids, [4] * 16, [False] * 16) == [0] * 16
    pol.observe_step(16, 0.010 + 0.003 * 16)
    ks = pol.choose(ids, [4] * 16, [False] * 16)
    assert sorted(ks) == [0] * 15 + [4]  # a probe: one request at its cap
    pol.observe_step(20, 0.010 + 0.003 * 20)
    assert pol.cost() == pytest.approx((0.010, 0.003))
    assert sorted(pol.choose(ids, [4] * 16, [False] * 16)) == [0] * 15 + [4]  # no proposer call measured yet
    pol.observe_propose(4, 0.0004)
    assert pol.choose(ids, [4] * 16, [False] * 16) == [0] * 16  # alpha 0.5 < b / (b + a / B) = 0.83
    one = SpecPolicy(4)
    assert one.choose(["r"], [4], [False]) == [0]
    one.observe_step(1, 0.010)
    assert one.choose(["r"], [4], [False]) == [4]
    one.observe_step(5, 0.011)
    one.observe_propose(4, 0.0004)
    assert one.choose(["r"], [4], [False]) == [4]  # weight-bound at batch 1: speculation pays


def test_policy_keeps_proposals_under_double_the_largest_measured_step():
    """The fit is not trusted far past its samples: a flat fit measured up to 5 tokens allows 10 at most."""
    pol = SpecPolicy(4)
    for t in (1, 5, 1, 5):
        pol.observe_step(t, 0.010)
    pol.observe_propose(4, 0.0)
    ids = [f"b{i}" for i in range(4)]
    assert sum(pol.choose(ids, [4] * 4, [False] * 4)) == 2 * 5 - 4


def simulate(pol: SpecPolicy | None, batch: int, a: float, b: float, alpha: float, steps: int = 200) -> float:
    """Tokens per second of `steps` decode steps of `batch` requests whose step costs a + b*T seconds and whose
    proposals are each accepted with probability alpha given the earlier ones (pol None: no speculation)."""
    import random

    rng, tokens, seconds = random.Random(0), 0, 0.0
    ids = [f"r{i}" for i in range(batch)]
    for _ in range(steps):
        ks = pol.choose(ids, [4] * batch, [False] * batch) if pol is not None else [0] * batch
        for rid, k in zip(ids, ks):
            kept = 0
            while kept < k and rng.random() < alpha:
                kept += 1
            tokens += 1 + kept
            if k and pol is not None:
                pol.observe_verify(rid, k, kept)
        seconds += a + b * (batch + sum(ks))
        if pol is not None:
            pol.observe_step(batch + sum(ks), a + b * (batch + sum(ks)))
            if sum(ks):
                pol.observe_propose(sum(ks), 0.0)  # a free proposer (n-gram)
    return tokens / seconds


@pytest.mark.parametrize("batch,a,b,alpha,gain", [(1, 0.020, 0.002, 0.45, 1.25),  # batch 1: 1.31x
                                                  (16, 0.025, 0.0027, 0.45, 1.0),  # 16 rows on 2 CPU cores
                                                  (64, 0.025, 0.0027, 0.9, 1.0)])  # high acceptance, 64 rows
def test_policy_never_loses_to_no_speculation_on_its_cost_model(batch, a, b, alpha, gain):
    """Driven by a simulated engine with the given step cost and acceptance, the policy's tokens per second,
    learning steps and probes included, are at least `gain` x those without speculation (within 2%)."""
    with_policy, without = simulate(SpecPolicy(4), batch, a, b, alpha), simulate(None, batch, a, b, alpha)
    assert with_policy >= gain * without * 0.98, (with_policy, without)


def test_counters_per_position():
    """Acceptance rate, mean accepted length and per-position acceptance."""
    c = SpecCounters()
    c.record(3, 1)
    c.record(2, 2)
    assert c.acceptance_rate == pytest.approx(3 / 5)
    assert c.mean_accepted_length == pytest.approx(1 + 3 / 2)
    assert c.per_position() == [1.0, 0.5, 0.0]


def test_config_errors_name_the_fix():
    """Bad method and bad k fail at construction, naming what to pass."""
    with pytest.raises(ConfigError, match="ngram"):
        SpeculativeConfig("medusa")
    with pytest.raises(ConfigError, match="draft:PATH"):
        SpeculativeConfig("draft:")
    with pytest.raises(ConfigError, match="num-speculative-tokens"):
        SpeculativeConfig("ngram", num_tokens=0)


def test_metrics_show_speculation():
    """/metrics carries drafts, proposed and accepted tokens, acceptance rate, mean length and per position."""
    from meshlm.engine.engine import EngineStats
    from meshlm.serve.engine_loop import Snapshot
    from meshlm.serve.metrics import ServerMetrics, parse_samples

    c = SpecCounters()
    c.record(4, 4)
    c.record(4, 1)
    s = parse_samples(ServerMetrics(lambda: Snapshot(EngineStats(speculative=c))).render().decode())
    p = "meshlm_spec_decode"
    assert (s[f"{p}_num_drafts_total"], s[f"{p}_num_draft_tokens_total"], s[f"{p}_num_accepted_tokens_total"]) \
        == (2, 8, 5)
    assert s[f"{p}_acceptance_rate"] == pytest.approx(5 / 8) and s[f"{p}_mean_accepted_length"] == 3.5
    assert [s[f'{p}_acceptance_rate_per_pos{{position="{i}"}}'] for i in range(4)] == [1.0, 0.5, 0.5, 0.5]
    assert s[f'{p}_num_accepted_tokens_per_pos_total{{position="0"}}'] == 2
    assert "meshlm_spec_decode" not in ServerMetrics(lambda: Snapshot()).render().decode()  # off: no series


def test_cli_flags_build_the_config():
    """generate, serve and bench take --speculative / --num-speculative-tokens / --speculative-policy."""
    from meshlm.cli import build_parser, speculative_config

    parser = build_parser()
    g = parser.parse_args(["generate", "hi", "--speculative", "ngram", "--num-speculative-tokens", "6"])
    assert speculative_config(g) == SpeculativeConfig("ngram", 6, adaptive=True)
    s = parser.parse_args(["serve", "--speculative", "draft:/m", "--speculative-policy", "always"])
    assert speculative_config(s) == SpeculativeConfig("draft:/m", 4, adaptive=False)
    b = parser.parse_args(["bench", "--layout", "tp=1", "--speculative", "self-int4"])
    assert speculative_config(b).method == "self-int4"
    assert speculative_config(parser.parse_args(["generate", "hi"])) is None
    with pytest.raises(ConfigError, match="num-speculative-tokens"):
        speculative_config(parser.parse_args(["generate", "hi", "--speculative", "ngram",
                                              "--num-speculative-tokens", "0"]))


HOT = SamplingParams(temperature=0.8)


def decoding(rid: str, prompt_len: int, params: SamplingParams = HOT) -> Request:
    """A running request that is decoding: every token but the last computed, nothing in flight."""
    return decoding_request(rid, prompt_len, params, max_new=1000)


def test_speculator_times_the_proposer_apart_and_leaves_catch_up_out(monkeypatch):
    """The proposer's seconds are its own cost term (not the target step's), and a draft's first pass over a
    long prompt is not charged as per-token cost: speculation stays on after it."""
    import meshlm.engine.spec_engine as spec_engine

    clock = FakeClock()
    monkeypatch.setattr(spec_engine.time, "perf_counter", clock)
    sp = Speculator(CatchUpProposer(clock, per_token=0.0005, per_fed=0.001), SpeculativeConfig("ngram", 4))
    req = decoding("r", prompt_len=500)  # catching up on 501 tokens costs 0.5 s: 50 target steps
    sched = SimpleNamespace(running=[req], waiting=[])
    for step in range(30):
        sp.propose(sched, 1)
        assert len(req.draft) == (0 if step < 2 else 4), step  # first steps without (the policy learns b)
        clock.now += 0.010  # the target step: flat 10 ms   # ... then never turned off by the catch-up
        sp.step_done([1 + len(req.draft)], busy=True)
        if req.draft:
            sp.record(Scheduled(req, len(req.tokens) - 1, 1, req.draft), 4)
        req.tokens += [1, 1, 1, 1, 5] if req.draft else [5]
        req.num_computed = req.num_scheduled = len(req.tokens) - 1
        req.draft = ()
    assert sp.catch_up_seconds == pytest.approx(0.503 + 0.002)  # the first call only (at step 2: 503 fed)
    assert sp.policy.cost() == pytest.approx((0.010, 0.0), abs=1e-9)  # the target's step without the proposer
    # one call size (4 proposed, 5 caught up on): all of it per proposed token, the steady catch-up included
    assert sp.policy.proposer_cost() == pytest.approx((0.0, 0.0005 + 0.001 * 5 / 4), rel=1e-6)


def test_seeded_sampled_requests_propose_the_configured_k():
    """A seeded sampled request gets the configured k where the policy gives an unseeded one none."""
    sp = Speculator(CatchUpProposer(FakeClock(), 0.0, 0.0), SpeculativeConfig("ngram", 3))
    for t in (1, 5, 1, 5, 9, 1):
        sp.policy.observe_step(t, 0.001 * t)  # tokens cost: speculation loses throughput
    sp.policy.observe_propose(3, 0.0)
    seeded = decoding("s", 10, SamplingParams(temperature=0.8, seed=1))
    unseeded, greedy = decoding("u", 10), decoding("g", 10, SamplingParams())
    others = [decoding(f"o{i}", 10) for i in range(30)]
    for r in [unseeded, greedy, *others]:  # past their first-step probe
        sp.policy.observe_verify(r.id, 3, 0)
    sp.propose(SimpleNamespace(running=[seeded, unseeded, greedy, *others], waiting=[]), 1)
    assert (seeded.draft, unseeded.draft, greedy.draft) == ((1, 1, 1), (), ())
