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


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from: logits [..., V] -> probs [..., V] (fp32), after
    temperature, top-k and top-p. The one definition the sampler and speculative verification share."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs / sorted_probs.sum(-1, keepdim=True))
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V] (fp32 math)."""
    if params.greedy:
        return int(torch.argmax(logits.float()))
    return int(torch.multinomial(target_probs(logits, params), 1, generator=generator))
