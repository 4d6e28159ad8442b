"""When to speculate: measured step cost against measured acceptance, decided each step.

A step of T tokens costs about a + b*T seconds (weights streamed once, plus per-token work); a running
least-squares fit over recent steps (decay DECAY per step) gives a and b. Acceptance per position is
counted as verification happens: alpha_i = P(position i accepted | positions < i accepted). With B requests
decoding and k proposals each, a step costs a + b*(B*(k+1) + other) and emits B * E(k) tokens, E(k) =
1 + sum_{j=1..k} prod_{i<=j} alpha_i. The policy picks the k in 0..k_max with the most tokens per second,
so at batch 1 (cost ~ a, flat in T) it proposes k_max, and once the batch makes steps compute-bound
(b*B*k comparable to a) it turns speculation off. Until a slope is measured it assumes proposals are free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECAY = 0.98  # weight of a step's sample after each later step: a window of about 50 steps
PRIOR_ACCEPT = (1.0, 2.0)  # pseudo-counts (accepted, reached): alpha 0.5 before any verification
PROBE_EVERY = 64  # steps without speculation after which one step proposes again, to re-measure acceptance


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


class SpecPolicy:
    """Chooses each step's proposal length from the step-cost fit and the acceptance counts."""

    def __init__(self, k_max: int, adaptive: bool = True) -> None:
        self.k_max, self.adaptive = k_max, adaptive
        self.sums = [0.0] * 5  # decayed sum of w, w*T, w*T^2, w*y, w*T*y over steps (T tokens, y seconds)
        self.reached = [PRIOR_ACCEPT[1]] * k_max  # decayed: drafts whose position i was verified
        self.kept = [PRIOR_ACCEPT[0]] * k_max  # of those, accepted
        self.idle_steps = 0  # steps in a row the policy chose not to speculate

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A finished step's token count and its seconds (time since the previous step finished)."""
        s = [x * DECAY for x in self.sums]
        self.sums = [s[0] + 1, s[1] + tokens, s[2] + tokens * tokens, s[3] + seconds, s[4] + tokens * seconds]

    def observe_verify(self, num_proposed: int, num_accepted: int) -> None:
        """One verification: positions 0..num_accepted were reached, 0..num_accepted-1 accepted."""
        for i in range(min(num_accepted + 1, num_proposed, self.k_max)):
            self.reached[i] = self.reached[i] * DECAY + 1
            self.kept[i] = self.kept[i] * DECAY + (i < num_accepted)

    def cost(self) -> tuple[float, float]:
        """Fitted (a, b) of seconds = a + b * tokens (a step measured first); b = 0 until steps differ in size."""
        w, t, t2, y, ty = self.sums
        if w <= 0:
            return 0.0, 0.0
        var = t2 / w - (t / w) ** 2
        b = max(0.0, (ty / w - (t / w) * (y / w)) / var) if var > 1e-9 else 0.0
        return max(y / w - b * t / w, 1e-9), b

    def expected_tokens(self, k: int) -> float:
        """E(k): tokens a verification of k proposals emits on average."""
        e, run = 1.0, 1.0
        for i in range(k):
            run *= self.kept[i] / self.reached[i]
            e += run
        return e

    def choose_k(self, decoding: int, other_tokens: int = 0) -> int:
        """Proposal length for this step's `decoding` requests (0: don't speculate)."""
        if not self.adaptive or decoding == 0 or self.sums[0] <= 0:  # no step measured yet: speculate
            return self.k_max
        a, b = self.cost()
        best_k, best_rate = 0, decoding / (a + b * (decoding + other_tokens))
        for k in range(1, self.k_max + 1):
            rate = decoding * self.expected_tokens(k) / (a + b * (decoding * (k + 1) + other_tokens))
            if rate > best_rate * 1.02:  # a clear gain only: speculation also costs the proposer's time
                best_k, best_rate = k, rate
        self.idle_steps = self.idle_steps + 1 if best_k == 0 else 0
        if self.idle_steps >= PROBE_EVERY:  # acceptance moves with the text: look again now and then
            self.idle_steps = 0
            return self.k_max
        return best_k
