"""Logits -> tokens: greedy, temperature, top-k, top-p, with a per-request generator."""

from __future__ import annotations

import torch

from meshlm.config import SamplingParams


def make_generator(seed: int | None) -> torch.Generator | None:
    """A seeded CPU generator, or None to use the global RNG."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a request's token is drawn from: logits [..., V] -> probabilities [..., V] (fp32) after
    temperature, top-k and top-p; each row sums to 1. Greedy params give the one-hot row of the argmax."""
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    w = _weights(logits, params)
    return w / w.sum(-1, keepdim=True)


def _weights(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Unnormalised sampling weights [..., V] (fp32 logits in): softmax after temperature and top-k, top-p's
    tail zeroed; multinomial draws from them as they are."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(p, dim=-1, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, order, sorted_probs)
    return p


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V] (fp32 math)."""
    if params.greedy:
        return int(torch.argmax(logits.float()))
    return int(torch.multinomial(_weights(logits.float(), params), 1, generator=generator))
