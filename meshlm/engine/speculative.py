"""Speculative decoding: proposers behind one small interface, and verification of their proposals.

A proposer looks at a running request's tokens (prompt + generated) and proposes up to k next tokens; the
target model scores them all in one step and verification keeps the longest acceptable prefix plus one
token of its own, so a step yields 1..k+1 tokens. Proposers are driver-side (rank 0's process): they never
touch the target's ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from meshlm.engine.request import Request


@dataclass(frozen=True)
class Proposal:
    """Up to k proposed next tokens of one request.

    probs: [len(tokens), target_vocab] float32, the distribution each token was drawn from (after the
    request's temperature / top-k / top-p), for rejection sampling; None for a deterministic proposer
    (n-gram, or a greedy draft), which rejection sampling treats as one-hot.
    """

    tokens: tuple[int, ...] = ()
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    """Proposes tokens for running requests; stateless toward the engine apart from release()."""

    name: str  # "ngram" | "draft" | "self-int4": metrics label

    def propose(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[Proposal]:
        """For each request, up to ks[i] tokens that would follow req.tokens (may propose fewer, or none)."""
        ...

    def release(self, request_id: str) -> None:
        """Forget a finished, aborted or preempted request (free any state the proposer keeps for it)."""
        ...
