"""How much to speculate, per request and step: measured costs against measured acceptance.

Costs: least-squares fits over recent samples (decay DECAY per sample, a window of about 50):
  target step     seconds = a + b * T   T tokens in a decode step, the proposer's time taken out (pp > 1: the
                                        interval between step ends over the mean T of the steps in flight, sampled
                                        only while every step in flight decodes; engine/spec_engine.py)
  proposer call   seconds = c + d * n   n tokens proposed in the call; a call that caught up on more than
                                        k_max + 1 tokens of a request (a draft's first pass over a prompt, or
                                        its return after a pause) is left out of this fit and feeds the next
  catch-up        seconds = f * m       m tokens a proposer takes in before proposing (d until measured)
Acceptance: alpha_r,i = P(position i of request r accepted | earlier ones accepted), counted per request and
over PRIOR pseudo-verifications at the current engine-wide estimate (itself 0.5 before any verification), so
one request's low acceptance does not keep another from speculating, and what probes learn reaches requests
that have not proposed yet.

Choice, for the whole batch: B requests decoding, k_r proposals each, K = sum_r k_r. A step emits
sum_r E_r(k_r) tokens, E_r(k) = 1 + sum_{j=1..k} prod_{i<=j} alpha_r,i, in a + b*(B + K) + [K > 0]*(c + d*K)
seconds, plus f * m_r * min(1, (cap_r + 1) / left_r) for each proposing request r the proposer must first catch
up on m_r > k_max + 1 tokens (its catch-up spread over the left_r tokens it may still generate: a draft's prompt
pass pays back over a long answer, not in a request's last steps). Each proposal costs b + d and gains
prod_{i<=j} alpha_r,i, non-increasing in j, so the policy takes the n largest gains with the most tokens per
second and speculates only when that beats n = 0 (no speculation, which also saves c) by MARGIN. At batch 1 with
a flat step (weight-bound) it proposes k_max wherever acceptance pays for its proposer; once a batch's rows cost
(b*B outweighs a) a proposal pays only at an acceptance near b / (b + a/B) and speculation is off.
Learning the costs: with every measured decode step the same size the slope b is unknown, so the policy sizes the
next step differently: no proposals (a new engine's first step), or, when the steps so far had none, one request
proposing its cap; until a proposer call without catch-up is measured (a draft's first call for a request is one),
one request proposes its cap each step (the one the proposer is furthest along with: the shortest catch-up).
Once fitted, a step's proposals are kept under double the largest step measured (the fit is not trusted far past
its samples). Probes: after probe_every decode steps without proposals, one request (the shortest catch-up, then
the longest without proposals) proposes its cap once to measure its acceptance, if proposals all accepted would
pay, catch-up included; each probe doubles probe_every (PROBE_EVERY up to PROBE_MAX) and a step that speculates
on its own merit resets it, so a batch where speculation keeps losing probes O(log steps) times.
Requests with a fixed k (seeded sampled ones, engine/spec_engine.py) count in the costs as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

DECAY = 0.98  # weight of a sample after each later one: a window of about 50
PRIOR = 2.0  # pseudo-verifications at the engine-wide acceptance that start each request's count
PRIOR_ACCEPT = 0.5  # engine-wide alpha before any verification
PROBE_EVERY = 16  # decode steps without proposals after which one request proposes once again
PROBE_MAX = 1024  # the probe interval doubles after each probe, up to this, until speculation pays again
MARGIN = 0.05  # speculation must beat no speculation's predicted tokens/s by this share (timing noise)

log = logging.getLogger(__name__)


@dataclass
class SpecCounters:
    """Totals since start: drafts verified, tokens proposed and accepted, and per position."""

    drafts: int = 0  # verifications of a non-empty proposal
    proposed: int = 0
    accepted: int = 0
    proposed_at: list[int] = field(default_factory=list)  # [k_max] drafts that had a token at position i
    accepted_at: list[int] = field(default_factory=list)  # [k_max] drafts whose token i was accepted

    def record(self, num_proposed: int, num_accepted: int) -> None:
        """One verification: num_accepted of num_proposed tokens kept."""
        need = max(num_proposed, len(self.proposed_at))
        self.proposed_at += [0] * (need - len(self.proposed_at))
        self.accepted_at += [0] * (need - len(self.accepted_at))
        self.drafts += 1
        self.proposed += num_proposed
        self.accepted += num_accepted
        for i in range(num_proposed):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < num_accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed tokens."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification emits on average: accepted + the target's own one."""
        return 1.0 + self.accepted / self.drafts if self.drafts else 0.0

    def per_position(self) -> list[float]:
        """Acceptance rate of each proposal position (accepted at i over drafts with a token at i)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at)]


class _Fit:
    """Decayed least-squares fit of y = a + b*x; with too little spread in x, all of y goes to one term."""

    def __init__(self, flat: bool) -> None:
        self.flat = flat  # no spread: b = 0 (flat) or a = 0 (y proportional to x)
        self.sums = [0.0] * 5  # decayed sum of w, w*x, w*x^2, w*y, w*x*y
        self.largest = 0.0  # the largest x seen

    def observe(self, x: float, y: float) -> None:
        """One sample."""
        s = [v * DECAY for v in self.sums]
        self.sums = [s[0] + 1, s[1] + x, s[2] + x * x, s[3] + y, s[4] + x * y]
        self.largest = max(self.largest, x)

    def mean(self) -> float:
        """Weighted mean of x (0 before any sample)."""
        return self.sums[1] / self.sums[0] if self.sums[0] > 0 else 0.0

    def spread(self) -> bool:
        """True once samples at two different x came in: a slope can be fitted."""
        w, x, x2 = self.sums[:3]
        return w > 0 and x2 / w - (x / w) ** 2 > 1e-9 * max(1.0, (x / w) ** 2)

    @property
    def measured(self) -> bool:
        """True once a sample came in."""
        return self.sums[0] > 0

    def fit(self) -> tuple[float, float]:
        """(a, b), both >= 0; (0, 0) before any sample."""
        w, x, x2, y, xy = self.sums
        if w <= 0:
            return 0.0, 0.0
        var = x2 / w - (x / w) ** 2
        if self.spread():
            b = max(0.0, (xy / w - (x / w) * (y / w)) / var)
            return max(y / w - b * x / w, 0.0), b
        if self.flat or x <= 0:
            return y / w, 0.0
        return 0.0, y / x


class _Accept:
    """Decayed per-position acceptance counts: reached[i] verifications got to position i, kept[i] accepted it."""

    def __init__(self, k_max: int, prior: Sequence[float] = (), weight: float = 0.0) -> None:
        self.reached = [weight] * k_max
        self.kept = [weight * a for a in prior] if prior else [0.0] * k_max

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        """Positions 0..num_accepted were reached, 0..num_accepted-1 accepted."""
        for i in range(min(num_accepted + 1, num_proposed, len(self.reached))):
            self.reached[i] = self.reached[i] * DECAY + 1
            self.kept[i] = self.kept[i] * DECAY + (i < num_accepted)


class _Req:
    """One request's acceptance counts and its decode steps since it last proposed."""

    def __init__(self, k_max: int) -> None:
        self.accept = _Accept(k_max)
        self.idle = PROBE_EVERY  # a new request counts as long without proposals: first in line to probe


class SpecPolicy:
    """Chooses each decoding request's proposal length from the cost fits and its acceptance counts."""

    def __init__(self, k_max: int, adaptive: bool = True) -> None:
        self.k_max, self.adaptive = k_max, adaptive
        self.step = _Fit(flat=True)  # target step seconds over tokens: flat until steps differ in size
        self.proposer = _Fit(flat=False)  # proposer seconds over proposed tokens: per token until calls differ
        self.catch_up = _Fit(flat=False)  # a draft's seconds over the tokens it caught up on (y proportional to x)
        self.probe_every = PROBE_EVERY  # decode steps without proposals before the next probe
        self.accept = _Accept(k_max, [PRIOR_ACCEPT] * k_max, 2.0)  # engine-wide
        self.reqs: dict[str, _Req] = {}
        self.quiet = 0  # decode steps since any free request last proposed

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A finished decode step: its token count and the target's seconds (the proposer's taken out)."""
        self.step.observe(tokens, seconds)

    def observe_propose(self, tokens: int, seconds: float) -> None:
        """A proposer call without a long catch-up: tokens proposed, seconds it took."""
        self.proposer.observe(tokens, seconds)

    def observe_catch_up(self, tokens: int, seconds: float) -> None:
        """A proposer call's seconds spent catching up on `tokens` tokens (the proposals' own cost taken out)."""
        self.catch_up.observe(tokens, seconds)

    def observe_verify(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """One verification of a request's proposal: num_accepted of num_proposed kept."""
        self.accept.observe(num_proposed, num_accepted)
        req = self._req(request_id)
        req.accept.observe(num_proposed, num_accepted)
        req.idle = 0

    def release(self, request_id: str) -> None:
        """Forget a request that ended."""
        self.reqs.pop(request_id, None)

    def cost(self) -> tuple[float, float]:
        """Fitted (a, b) of target step seconds = a + b * tokens."""
        return self.step.fit()

    def proposer_cost(self) -> tuple[float, float]:
        """Fitted (c, d) of proposer call seconds = c + d * proposed tokens."""
        return self.proposer.fit()

    def is_catch_up(self, tokens: int) -> bool:
        """True when taking in `tokens` tokens of a request is a catch-up (a draft's prompt pass, or its return
        after a pause), not the steady feed of a proposing request (its last step's tokens): more than k_max + 1."""
        return tokens > self.k_max + 1

    def catch_up_cost(self) -> float:
        """Seconds per token a proposer takes to catch up (a draft's prompt pass): the proposal's per-token cost
        until a catch-up is measured (a sequential draft step per token: an upper bound)."""
        return self.catch_up.fit()[1] if self.catch_up.measured else self.proposer.fit()[1]

    def alphas(self, request_id: str | None = None) -> list[float]:
        """alpha_i per position: engine-wide, or a request's own counts over PRIOR verifications at the engine-wide."""
        g = self.accept
        glob = [k / r if r > 0 else PRIOR_ACCEPT for k, r in zip(g.kept, g.reached)]
        req = self.reqs.get(request_id) if request_id is not None else None
        if req is None:
            return glob
        a = req.accept
        return [(k + PRIOR * p) / (r + PRIOR) for k, r, p in zip(a.kept, a.reached, glob)]

    def expected_tokens(self, k: int, request_id: str | None = None) -> float:
        """E(k): tokens a verification of k proposals emits on average."""
        e, run = 1.0, 1.0
        for alpha in self.alphas(request_id)[:k]:
            run *= alpha
            e += run
        return e

    def _req(self, request_id: str) -> _Req:
        if request_id not in self.reqs:
            self.reqs[request_id] = _Req(self.k_max)
        return self.reqs[request_id]

    def choose(self, request_ids: Sequence[str], caps: Sequence[int], fixed: Sequence[bool],
               other_tokens: int = 0, backlog: Sequence[int] = (), left: Sequence[int] = ()) -> list[int]:
        """Proposal length per decoding request, at most caps[i]; fixed[i]: exactly caps[i] (0: don't speculate).
        backlog[i]: tokens the proposer must catch up on before proposing for request i; left[i]: tokens the
        request may still generate (its catch-up is charged over them)."""
        if not self.adaptive:
            return list(caps)
        ks = [cap if fx else 0 for cap, fx in zip(caps, fixed)]
        free = [i for i, (cap, fx) in enumerate(zip(caps, fixed)) if cap > 0 and not fx]
        base = len(request_ids) + other_tokens + sum(ks)  # the step's tokens without (free) proposals
        behind = [n if self.is_catch_up(n) else 0 for n in backlog] or [0] * len(caps)  # a steady feed: in d
        if not self.step.spread() or not self.proposer.measured:  # the cost of a row or a proposal is unknown
            differs = not self.step.spread() and abs(self.step.mean() - base) >= 0.5  # k = 0 gives a new size
            if free and self.step.measured and not differs:  # one request proposes: a new size, a proposer call
                i = min(free, key=lambda i: (behind[i], -self.expected_tokens(caps[i], request_ids[i])))
                ks[i] = caps[i]
            log.debug("spec policy: B=%d costs not yet fitted (step sizes: %s, proposer measured: %s): ks=%s",
                      len(ks), "several" if self.step.spread() else "one", self.proposer.measured, ks)
            return self._done(request_ids, ks, fixed)
        a, b = self.cost()
        c, d = self.proposer_cost()
        f = self.catch_up_cost()
        # seconds charged to a step in which request i proposes: its catch-up, spread over the tokens it has left
        catch = [f * n * min(1.0, (cap + 1) / max(rest, 1)) for n, cap, rest in
                 zip(behind, caps, left or [1] * len(caps))]
        num = sum(self.expected_tokens(k, rid) if k else 1.0 for k, rid in zip(ks, request_ids))
        fixed_proposed = sum(ks)
        limit = int(2 * self.step.largest) - base  # free proposals: at most double the largest step measured

        def rate(tokens: float, proposed: int, extra: float) -> float:
            return tokens / (a + b * (base + proposed) + extra + (c + d * (fixed_proposed + proposed)
                                                                   if fixed_proposed + proposed else 0.0))

        gains = []  # (gain, i): proposal j of request i gains prod_{<=j} alpha, non-increasing in j
        for i in free:
            run = 1.0
            for alpha in self.alphas(request_ids[i])[:caps[i]]:
                run *= alpha
                gains.append((run, i))
        gains.sort(key=lambda g: -g[0])  # stable: a request's proposals stay in order
        none = best = rate(num, 0, 0.0)
        take, num0, extra, started = 0, num, 0.0, set()
        for n, (gain, i) in enumerate(gains[:max(limit, 0)], 1):
            num += gain
            if i not in started:  # a request's first proposal brings its catch-up
                started.add(i)
                extra += catch[i]
            if (r := rate(num, n, extra)) > best and r > none * (1 + MARGIN):
                best, take = r, n
        for _, i in gains[:take]:
            ks[i] += 1
        if take:
            self.probe_every = PROBE_EVERY
        elif free and self.quiet >= self.probe_every:  # nobody speculated for a while: one request probes
            # the cheapest to catch up on, then the longest without proposals
            i = min(free, key=lambda i: (behind[i], -self._req(request_ids[i]).idle))
            if rate(num0 + caps[i], caps[i], catch[i]) > none:  # (were they all accepted, its proposals would pay)
                ks[i] = caps[i]
                self.probe_every = min(2 * self.probe_every, PROBE_MAX)  # back off while probes find no gain
        log.debug("spec policy: B=%d a=%.4f b=%.6f c=%.4f d=%.6f f=%.6f: no speculation %.1f tok/s, speculation "
                  "(%d proposals) %.1f tok/s predicted; ks=%s", len(ks), a, b, c, d, f, none, take, best, ks)
        return self._done(request_ids, ks, fixed)

    def _done(self, request_ids: Sequence[str], ks: list[int], fixed: Sequence[bool]) -> list[int]:
        """Count each request's decode steps without proposals, and the engine's (fixed ones aside); return ks."""
        self.quiet = 0 if any(k and not fx for k, fx in zip(ks, fixed)) else self.quiet + 1
        for rid, k in zip(request_ids, ks):
            req = self._req(rid)
            req.idle = 0 if k else req.idle + 1
        return ks
