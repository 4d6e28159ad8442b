"""Debug check that every stage agrees on every request's positions and accepted count (MESHLM_CHECK_POSITIONS=1).

The driver alone plans positions: a step's SeqInput.start is the request's num_computed, which after a
speculative step counts the accepted proposals only. With the check on, the driver keeps a ledger of
(request id, first position, tokens) per submitted step and each request's num_computed after each collected
step; every rank records the positions it actually ran (ModelRunner.ledger, from the step's own position
tensor). `check` asserts that every rank's ledger equals the driver's and that each request's next step starts
exactly where its accepted tokens end, so no stage computes past a rollback or skips a position.
"""

from __future__ import annotations

import os

from meshlm.engine.paged_attention import StepInput
from meshlm.engine.scheduler import SchedulerOutput

Entry = tuple[tuple[str, int, int], ...]  # one step: (request id, first position, tokens) per sequence


def enabled() -> bool:
    """True when MESHLM_CHECK_POSITIONS=1."""
    return os.environ.get("MESHLM_CHECK_POSITIONS") == "1"


class PositionLedger:
    """The driver's record of planned positions and accepted ends, compared against every rank's."""

    def __init__(self) -> None:
        self.steps: list[Entry] = []
        self.computed_after: list[dict[str, int]] = []  # request id -> num_computed after each collected step
        self.preempted: set[str] = set()  # these restart from a cached prefix: no continuity to check

    def submitted(self, step: StepInput) -> None:
        """Record a submitted step (its seq_ids set)."""
        self.steps.append(tuple((i, s.start, s.n) for i, s in zip(step.seq_ids, step.seqs)))

    def collected(self, plan: SchedulerOutput) -> None:
        """Record where each request of a collected step now stands (accepted proposals counted)."""
        self.computed_after.append({it.req.id: it.req.num_computed for it in plan.items})

    def check(self, rank_ledgers: list[list[Entry]]) -> int:
        """Assert the invariant over every step since the last check (nothing in flight); returns the count."""
        for rank, theirs in enumerate(rank_ledgers):
            assert theirs == self.steps, f"rank {rank} ran other positions than the driver planned"
        last_end: dict[str, int] = {}
        for step, (entries, after) in enumerate(zip(self.steps, self.computed_after)):
            for rid, start, _ in entries:
                if rid in last_end and rid not in self.preempted:
                    assert start == last_end[rid], (f"step {step}: {rid} starts at {start}, but its accepted "
                                                    f"tokens end at {last_end[rid]}")
            last_end.update(after)
        checked = len(self.steps)
        self.steps.clear()
        self.computed_after.clear()
        return checked
