"""Logits -> tokens: greedy, temperature, top-k, top-p; a seeded request's draws keyed by token position.

A sampled request with a seed draws every random number from a generator keyed by (seed, absolute token
position, purpose): the plain sample (also the bonus token after a verification), the acceptance uniform and
the residual draw of rejection sampling, and a draft model's proposal. A draw never depends on how many draws
came before it, so how a request's tokens are split into steps does not move its random numbers. Without a
seed the draws come from torch's global RNG.
"""

from __future__ import annotations

import torch

from meshlm.config import SamplingParams

SAMPLE, ACCEPT, RESIDUAL, DRAFT = range(4)  # purposes of a keyed draw
MASK64 = (1 << 64) - 1


def mix_seed(seed: int, position: int, purpose: int) -> int:
    """A 63-bit seed from (request seed, token position, purpose): splitmix64 over the three."""
    z = seed & MASK64
    for v in (position, purpose):
        z = (z * 0x9E3779B97F4A7C15 + v + 0x632BE59BD9B4E019) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
    return z >> 1


def make_generator(seed: int | None) -> torch.Generator | None:
    """A seeded CPU generator, or None to use the global RNG."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def position_generator(seed: int | None, position: int, purpose: int) -> torch.Generator | None:
    """The generator of one keyed draw (None without a seed: the global RNG)."""
    return None if seed is None else make_generator(mix_seed(seed, position, purpose))


def uniform(seed: int | None, position: int, purpose: int) -> float:
    """One keyed U[0, 1) draw."""
    return float(torch.rand((), generator=position_generator(seed, position, purpose)))


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
