"""Speculative decoding without ranks: rejection sampling keeps the target distribution, greedy verification,
the n-gram lookup, block truncation, the scheduler's draft grants, the policy and the config's errors."""

from __future__ import annotations

import pytest
import torch

from meshlm.config import SamplingParams
from meshlm.engine.kv_cache import BlockManager
from meshlm.engine.request import Request
from meshlm.engine.sampler import target_probs
from meshlm.engine.scheduler import Scheduler, SchedulerConfig
from meshlm.engine.spec_policy import SpecCounters, SpecPolicy
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
    p = target_probs(LOGITS, PARAMS[kind])  # [V]
    if proposer == "draft":
        q = torch.softmax(torch.tensor([0.0, 2.0, 0.5, 1.0, -1.0, 0.0, 1.5, -2.0]), -1)  # unlike p
        x = torch.multinomial(q, N, replacement=True, generator=g)
        qs = q.expand(N, V)
    else:
        x, qs = torch.full((N,), 1, dtype=torch.long), None  # always propose token 1
    accepted, replacement = accept_or_resample(p.expand(N, V), x, qs, g)
    emitted = torch.where(accepted, x, replacement)
    counts = torch.bincount(emitted, minlength=V).float()
    assert tv(counts, p) < 0.01
    assert chi2_ok(counts, p)


def test_verify_sampled_two_positions_joint_distribution():
    """Over two proposed positions the emitted (first, second) pairs follow p1(a) * p2(b | a): the second row
    is only used after the first proposal is accepted (20k seeded runs of the engine's own function)."""
    params = SamplingParams(temperature=1.0)
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS.roll(3)])  # [3, V]: rows after t, d1, d2
    p = target_probs(logits, params)
    g = torch.Generator().manual_seed(7)
    draft = (7, 0)  # likely under p[0], p[1]: both paths (accept, reject) are taken often
    firsts = torch.zeros(V)
    seconds_after_accept = torch.zeros(V)
    for _ in range(20_000):
        out = verify_sampled(logits, params, draft, None, g)
        firsts[out[0]] += 1
        if out[0] == draft[0]:
            seconds_after_accept[out[1]] += 1
    assert tv(firsts, p[0]) < 0.02
    assert tv(seconds_after_accept, p[1]) < 0.03


def test_seeded_verification_reproduces():
    """The same seed gives the same emitted tokens."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3)
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    runs = [[verify(params, (1, 2, 3, 4), None, [0] * 5, logits, torch.Generator().manual_seed(3))
             for _ in range(5)] for _ in range(2)]
    assert runs[0] == runs[1]


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


def test_policy_speculates_when_steps_cost_the_same_and_stops_when_tokens_cost():
    """Flat step cost (weight-bound): propose k_max; cost proportional to tokens: don't speculate."""
    flat, linear = SpecPolicy(4), SpecPolicy(4)
    for t in (1, 5, 1, 5, 9, 1):
        flat.observe_step(t, 0.010)
        linear.observe_step(t, 0.001 * t)
    for i in range(20):
        for pol in (flat, linear):
            pol.observe_verify(4, 4 if i % 2 else 1)
    assert flat.choose_k(1) == 4
    assert linear.choose_k(64) == 0


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
