"""Verification of proposed tokens against the target's logits at every proposed position.

A request that proposed d = (d_1 .. d_k) is computed at k + 1 positions in one step: the target's rows
0..k give its distribution after tokens[-1], d_1, .., d_k. Verification returns the tokens the step emits:
the accepted prefix of d plus one token of the target's own (a correction at the first rejection, or a
bonus after k acceptances), 1..k+1 tokens.

Greedy: accept while d_i equals the target's argmax; the output is the target's greedy output exactly.
Sampled (Leviathan et al. 2023, Chen et al. 2023): accept d_i with probability min(1, p_i(d_i) / q_i(d_i)),
where p is the target's distribution after the request's temperature / top-k / top-p (sampler.target_probs)
and q the proposer's (one-hot when the proposer is deterministic); at the first rejection draw from
norm(max(p_i - q_i, 0)). Every emitted token is then distributed exactly as p, so speculation changes
speed, never the distribution. The draws come from the request's own generator, so a seed reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshlm.config import SamplingParams
from meshlm.engine.sampler import sample, target_probs


def verify_greedy(draft: Sequence[int], best: Sequence[int]) -> list[int]:
    """Tokens emitted for a greedy request: the prefix of draft equal to best [k+1] argmaxes, then best's next."""
    a = 0
    while a < len(draft) and draft[a] == best[a]:
        a += 1
    return [*draft[:a], best[a]]


def accept_or_resample(p: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent rejection trials: p, q [N, V] probs (q None: one-hot at x), x [N] proposed ids ->
    (accepted [N] bool, replacement [N] long drawn from norm(max(p - q, 0)) for use where not accepted)."""
    px = p.gather(1, x[:, None])[:, 0]  # [N]
    if q is None:
        qx = torch.ones_like(px)
        residual = p.scatter(1, x[:, None], 0.0)  # max(p - onehot(x), 0)
    else:
        qx = q.gather(1, x[:, None])[:, 0]
        residual = (p - q).clamp_(min=0.0)
    u = torch.rand(px.shape, generator=generator)
    accepted = u * qx < px  # u < p(x) / q(x), without dividing by a q(x) of 0
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)  # p == q: never rejected, any row
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


def verify_sampled(logits: torch.Tensor, params: SamplingParams, draft: Sequence[int], q: torch.Tensor | None,
                   generator: torch.Generator | None) -> list[int]:
    """Tokens emitted for a sampled request: logits [k+1, V] of the target, q [k, V] or None (one-hot)."""
    k = len(draft)
    p = target_probs(logits, params)  # [k+1, V]
    if k:
        accepted, replacement = accept_or_resample(p[:k], torch.tensor(draft, dtype=torch.long), q, generator)
        rejected = (~accepted).nonzero()
        if len(rejected):
            a = int(rejected[0, 0])
            return [*draft[:a], int(replacement[a])]
    return [*draft, int(torch.multinomial(p[k], 1, generator=generator))]


def verify(params: SamplingParams, draft: Sequence[int], q: torch.Tensor | None, best: Sequence[int],
           logits: torch.Tensor | None, generator: torch.Generator | None) -> list[int]:
    """Tokens a step emits for one request: best [k+1] argmaxes, logits [k+1, V] (None when greedy without
    logprobs); without a draft this is plain sampling, the same draws as without speculation."""
    if params.greedy:
        return verify_greedy(draft, best)
    assert logits is not None
    if not draft:
        return [sample(logits[0], params, generator)]
    return verify_sampled(logits, params, draft, q, generator)
