"""Speculative decoding: proposers behind one small interface, their configuration, and the factory.

A proposer looks at a running request's tokens (prompt + generated) and proposes up to k next tokens; the
target model scores them all in one step and verification (engine/verify.py) keeps the longest acceptable
prefix plus one token of its own, so a step yields 1..k+1 tokens. Proposers are driver-side (rank 0's
process): they never touch the target's ranks.

When the engine calls a proposer: at the start of a step, for each running request whose every known token
but the last is computed and that has nothing in flight (so req.tokens is exactly prompt + every emitted
token, the last one not yet in the KV cache); ks[i] >= 1 is already capped so the step can't pass
max_tokens. release(id) follows a request's end (finished, aborted, timed out) and its preemption. backlog(req)
is asked for every decoding request each step (cheap: no model work): the policy charges a catch-up it has not
paid yet, and a proposer does no work for a request while the policy gives it no proposals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from meshlm.engine.request import Request
from meshlm.errors import ConfigError

METHODS = "ngram | draft:PATH | self-int4"


@dataclass(frozen=True)
class Proposal:
    """Up to k proposed next tokens of one request.

    probs: [len(tokens), target_vocab] float32, the distribution each token was drawn from (after the
    request's temperature / top-k / top-p), for rejection sampling; None for a deterministic proposer
    (n-gram, or a greedy draft), which rejection sampling treats as one-hot.
    fed: tokens the proposer took in first (a draft model's catch-up: the accepted and bonus tokens of the last
    step, the whole prompt the first time); the policy keeps long catch-ups out of its per-token cost.
    """

    tokens: tuple[int, ...] = ()
    probs: torch.Tensor | None = None
    fed: int = 0


class Proposer(Protocol):
    """Proposes tokens for running requests; stateless toward the engine apart from release()."""

    name: str  # "ngram" | "draft" | "self-int4": metrics label

    def propose(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[Proposal]:
        """For each request, up to ks[i] tokens that would follow req.tokens (may propose fewer, or none)."""
        ...

    def backlog(self, req: Request) -> int:
        """Tokens of req it would take in before proposing (a draft's catch-up; 0 for a stateless proposer)."""
        ...

    def release(self, request_id: str) -> None:
        """Forget a finished, aborted or preempted request (free any state the proposer keeps for it)."""
        ...


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: which proposer, how many tokens a step may propose, whether the policy decides.

    method: "ngram" (prompt lookup), "draft:PATH" (a smaller checkpoint with the same tokenizer) or
    "self-int4" (the target's own weights quantized to int4). adaptive: the policy (engine/spec_policy.py)
    proposes only while the measured step cost says it raises tokens/s; False: always propose k.
    """

    method: str
    num_tokens: int = 4
    adaptive: bool = True
    ngram_min: int = 1  # shortest suffix n-gram the lookup matches
    ngram_max: int = 4  # longest; tried first

    def __post_init__(self) -> None:
        if not (self.method in ("ngram", "self-int4") or (self.method.startswith("draft:") and self.method[6:])):
            raise ConfigError(f"--speculative {self.method!r} is not a proposer; pick one of {METHODS} "
                              "(draft:PATH names a checkpoint with the target's tokenizer).")
        if not 1 <= self.num_tokens <= 16:
            raise ConfigError(f"--num-speculative-tokens must be in [1, 16], got {self.num_tokens}; "
                              "4 is a good start.")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"n-gram sizes need 1 <= min <= max, got min {self.ngram_min}, max {self.ngram_max}.")


class NgramProposer:
    """Prompt lookup (as vLLM's ngram proposer): find the request's last n tokens earlier in its own prompt
    + output, longest n first (ties: the latest occurrence), and propose the tokens that followed it."""

    name = "ngram"

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        self.n_min, self.n_max = n_min, n_max

    def lookup(self, tokens: Sequence[int], k: int) -> tuple[int, ...]:
        """Up to k tokens that followed the longest earlier match of tokens' suffix; () when none."""
        arr = np.asarray(tokens, dtype=np.int64)
        size = len(arr)
        if size < 2 or k < 1:
            return ()
        ends = np.flatnonzero(arr[:-1] == arr[-1])  # j: arr[j] == last token, an earlier occurrence
        if not len(ends):
            return ()
        length = np.ones(len(ends), dtype=np.int64)  # matched suffix length ending at each j
        alive = np.ones(len(ends), dtype=bool)
        for t in range(1, min(self.n_max, size - 1)):
            ok = alive & (ends - t >= 0)
            ok[ok] = arr[ends[ok] - t] == arr[size - 1 - t]
            length += ok
            alive = ok
        length = np.minimum(length, self.n_max)
        best = int(length.max())
        if best < self.n_min:
            return ()
        j = int(ends[np.flatnonzero(length == best)[-1]])  # the latest of the longest matches
        return tuple(int(x) for x in arr[j + 1:j + 1 + k])

    def propose(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[Proposal]:
        """One lookup per request in its own tokens (no state kept)."""
        return [Proposal(self.lookup(r.tokens, k)) for r, k in zip(reqs, ks)]

    def backlog(self, req: Request) -> int:
        """Nothing to take in: the lookup reads req.tokens."""
        return 0

    def release(self, request_id: str) -> None:
        """Nothing to forget: the lookup keeps no state."""


def check_proposer(cfg: SpeculativeConfig, target_model: str | None) -> None:
    """Refuse a draft whose tokenizer differs from the target's, before any process starts or weight loads."""
    if cfg.method.startswith("draft:"):
        from meshlm.engine.draft import check_same_tokenizer

        check_same_tokenizer(target_model, cfg.method[len("draft:"):])


def make_proposer(cfg: SpeculativeConfig, *, target_model: str | None, vocab_size: int,
                  threads: int | None = None, device: str | None = None) -> Proposer:
    """The proposer cfg.method names; a draft model loads here, on the driver's process."""
    if cfg.method == "ngram":
        return NgramProposer(cfg.ngram_min, cfg.ngram_max)
    from meshlm.engine.draft import DraftProposer  # torch model code: loaded only when asked for

    if cfg.method == "self-int4":
        return DraftProposer(model=target_model, quantize="int4", vocab_size=vocab_size, threads=threads,
                             device=device)
    return DraftProposer(model=cfg.method[len("draft:"):], quantize=None, vocab_size=vocab_size, threads=threads,
                         device=device)
