"""How much to speculate, per request and step: measured costs against measured acceptance.

Costs: least-squares fits over recent samples (decay DECAY per sample, a window of about 50):
  target step     seconds = a + b * T   T tokens in a decode step, the proposer's time taken out
  proposer call   seconds = c + d * n   n tokens proposed in the call; a call that caught up on more than
                                        k_max + 1 tokens of a request (a draft's first pass over a prompt, or
                                        its return after a pause) is left out: a one-off, not a per-token cost
Acceptance: alpha_r,i = P(position i of request r accepted | earlier ones accepted), counted per request and
started from PRIOR pseudo-verifications at the engine-wide estimate (itself 0.5 before any verification), so
one request's low acceptance does not keep another from speculating.

Choice: B requests decoding, k_r proposals each, K = sum_r k_r. A step emits sum_r E_r(k_r) tokens,
E_r(k) = 1 + sum_{j=1..k} prod_{i<=j} alpha_r,i, in a + b*(B + other + K) + [K > 0]*(c + d*K) seconds. The
policy takes the k_r maximising tokens per second: each proposal costs b + d and gains prod_{i<=j} alpha_r,i,
non-increasing in j, so the best set of n proposals is the n largest gains and the policy keeps the best such
prefix (n = 0: no speculation, which also saves c). At batch 1 with a flat step cost (weight-bound) it proposes
k_max wherever acceptance is worth its proposer; once b*B outweighs a it turns speculation off. Until a step is
measured it proposes k_max. A request left without proposals for PROBE_EVERY of its decode steps (and a new
one, at its first) proposes k_max once to measure its acceptance, when a proposal sure to be accepted would pay.
Requests with a fixed k (seeded sampled ones, engine/spec_engine.py) count in the costs as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DECAY = 0.98  # weight of a sample after each later one: a window of about 50
PRIOR = 2.0  # pseudo-verifications at the engine-wide acceptance that start each request's count
PRIOR_ACCEPT = 0.5  # engine-wide alpha before any verification
PROBE_EVERY = 16  # a request's decode steps without proposals after which it proposes once again


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

    def observe(self, x: float, y: float) -> None:
        """One sample."""
        s = [v * DECAY for v in self.sums]
        self.sums = [s[0] + 1, s[1] + x, s[2] + x * x, s[3] + y, s[4] + x * y]

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
        if var > 1e-9 * max(1.0, (x / w) ** 2):
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

    def __init__(self, k_max: int, prior: Sequence[float]) -> None:
        self.accept = _Accept(k_max)
        self.prior = list(prior)  # the engine-wide alphas when the request started
        self.idle = PROBE_EVERY  # a new request probes at its first decode step


class SpecPolicy:
    """Chooses each decoding request's proposal length from the cost fits and its acceptance counts."""

    def __init__(self, k_max: int, adaptive: bool = True) -> None:
        self.k_max, self.adaptive = k_max, adaptive
        self.step = _Fit(flat=True)  # target step seconds over tokens: flat until steps differ in size
        self.proposer = _Fit(flat=False)  # proposer seconds over proposed tokens: per token until calls differ
        self.accept = _Accept(k_max, [PRIOR_ACCEPT] * k_max, 2.0)  # engine-wide
        self.reqs: dict[str, _Req] = {}

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A finished decode step: its token count and the target's seconds (the proposer's taken out)."""
        self.step.observe(tokens, seconds)

    def observe_propose(self, tokens: int, seconds: float) -> None:
        """A proposer call without a long catch-up: tokens proposed, seconds it took."""
        self.proposer.observe(tokens, seconds)

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

    def alphas(self, request_id: str | None = None) -> list[float]:
        """alpha_i per position: engine-wide, or a request's own counts over its prior."""
        g = self.accept
        glob = [k / r if r > 0 else PRIOR_ACCEPT for k, r in zip(g.kept, g.reached)]
        req = self.reqs.get(request_id) if request_id is not None else None
        if req is None:
            return glob
        a = req.accept
        return [(k + PRIOR * p) / (r + PRIOR) for k, r, p in zip(a.kept, a.reached, req.prior)]

    def expected_tokens(self, k: int, request_id: str | None = None) -> float:
        """E(k): tokens a verification of k proposals emits on average."""
        e, run = 1.0, 1.0
        for alpha in self.alphas(request_id)[:k]:
            run *= alpha
            e += run
        return e

    def _req(self, request_id: str) -> _Req:
        if request_id not in self.reqs:
            self.reqs[request_id] = _Req(self.k_max, self.alphas())
        return self.reqs[request_id]

    def choose(self, request_ids: Sequence[str], caps: Sequence[int], fixed: Sequence[bool],
               other_tokens: int = 0) -> list[int]:
        """Proposal length per decoding request, at most caps[i]; fixed[i]: exactly caps[i] (0: don't speculate)."""
        if not self.adaptive or not self.step.measured:  # no step measured yet: speculate
            return list(caps)
        a, b = self.cost()
        c, d = self.proposer_cost()
        ks = [cap if fx else 0 for cap, fx in zip(caps, fixed)]
        num = sum(self.expected_tokens(k, rid) if k else 1.0 for k, rid in zip(ks, request_ids))
        base = len(request_ids) + other_tokens

        def rate(tokens: float, proposed: int) -> float:
            return tokens / (a + b * (base + proposed) + (c + d * proposed if proposed else 0.0))

        gains = []  # (gain, i): proposal j of request i gains prod_{<=j} alpha, non-increasing in j
        for i, (rid, cap, fx) in enumerate(zip(request_ids, caps, fixed)):
            run = 1.0
            for alpha in ([] if fx else self.alphas(rid)[:cap]):
                run *= alpha
                gains.append((run, i))
        gains.sort(key=lambda g: -g[0])  # stable: a request's proposals stay in order
        proposed = sum(ks)
        best, take = rate(num, proposed), 0
        for n, (gain, _) in enumerate(gains, 1):
            num += gain
            if (r := rate(num, proposed + n)) > best:
                best, take = r, n
        for _, i in gains[:take]:
            ks[i] += 1
        # would one more proposal, sure to be accepted, pay? (gain 1 against its cost at the chosen rate)
        sure_pays = 1.0 > best * (b + d + (0.0 if sum(ks) else c))
        for i, (rid, cap, fx) in enumerate(zip(request_ids, caps, fixed)):
            req = self._req(rid)
            req.idle = 0 if ks[i] else req.idle + 1
            if not fx and req.idle > PROBE_EVERY and sure_pays:  # acceptance moves with the text: look again
                ks[i], req.idle = cap, 0
        return ks
