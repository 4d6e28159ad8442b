"""Context parallelism: where a prompt's tokens are computed and stored across cp ranks, how partial
attention results merge, and which ring a prefill uses (Meta, arXiv 2411.01783).

Compute layout (prefill): a sequence's n new tokens are cut into 2N chunks (N = cp); rank i computes
chunks i and 2N-1-i, so every rank gets an early and a late chunk and the causal work is balanced. When n
does not divide by 2N the last n % 2N chunks are one token longer; so the last chunk is never empty and
the sampled (last) token is always computed on rank 0.

Storage layout (the KV cache, prefill and decode alike): token at position p lives on rank p % N at local
index p // N: round-robin by token. A block id of the driver's block table covers block_size * N global
positions, block_size slots on every rank (see kv_slot), so one BlockManager with block_size * N plans
every rank's pool and its prefix hashes stay exact per shard.

Merge: partial attention over disjoint key sets combines exactly by log-sum-exp in fp32; a query that
sees no key in a block has lse = -inf there and weight 0 (a query seeing no key at all gets 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RING_CHOICES = ("auto", "pass-kv", "pass-q")


def chunk_bounds(n: int, cp: int) -> list[tuple[int, int]]:
    """The 2*cp chunks [a, b) of range(n): equal lengths, the last n % (2*cp) chunks one longer."""
    parts = 2 * cp
    base, extra = divmod(n, parts)
    bounds, a = [], 0
    for j in range(parts):
        b = a + base + (1 if j >= parts - extra else 0)
        bounds.append((a, b))
        a = b
    return bounds


def shard_offsets(n: int, cp: int, rank: int) -> list[int]:
    """Offsets in [0, n) that `rank` computes: chunks rank and 2*cp-1-rank, ascending."""
    bounds = chunk_bounds(n, cp)
    (a, b), (c, d) = bounds[rank], bounds[2 * cp - 1 - rank]
    return [*range(a, b), *range(c, d)]


def kv_owner(pos: int, cp: int) -> int:
    """The rank that stores the K/V of the token at position pos."""
    return pos % cp


def kv_slot(pos: int, table: tuple[int, ...] | list[int], block_size: int, cp: int) -> int:
    """Pool slot of position pos on its owner rank: block table[pos // (bs * cp)], row (pos // cp) % bs."""
    return table[pos // (block_size * cp)] * block_size + (pos // cp) % block_size


def owned_slots(table: tuple[int, ...] | list[int], stop: int, block_size: int, cp: int,
                rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [0, stop) whose K/V `rank` stores, and their slots in its pool (kv_slot, vectorized)."""
    p = torch.arange(rank, max(rank, stop), cp)
    return p, torch.tensor(table, dtype=torch.long)[p // (block_size * cp)] * block_size + (p // cp) % block_size


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                      tile_bytes: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, Hq, D], k/v [M, Hkv, D], visible [Tq, M] -> out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32.

    Softmax attention over the visible keys only; a query with no visible key gets out 0 and lse -inf.
    Queries go in tiles so the fp32 scores [Hq, tile, M] stay under tile_bytes.
    """
    tq, hq, d = q.shape
    m, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    out = torch.zeros(tq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((tq, hq), -math.inf, dtype=torch.float32, device=q.device)
    if tq == 0 or m == 0:
        return out, lse
    kf = k.float().transpose(0, 1).unsqueeze(1)  # [Hkv, 1, M, D]
    vf = v.float().transpose(0, 1).unsqueeze(1)
    tile = max(1, tile_bytes // (4 * hq * m))
    for a in range(0, tq, tile):
        b = min(tq, a + tile)
        qf = q[a:b].float().view(b - a, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, g, t, D]
        s = (qf @ kf.transpose(-1, -2)) * scale  # [Hkv, g, t, M]
        s = s.masked_fill(~visible[a:b], -math.inf)
        l_ = torch.logsumexp(s, dim=-1)  # [Hkv, g, t]
        p = torch.exp(s - torch.where(torch.isinf(l_), 0.0, l_).unsqueeze(-1))  # masked entries: exp(-inf) = 0
        o = p @ vf  # [Hkv, g, t, D]
        out[a:b] = o.permute(2, 0, 1, 3).reshape(b - a, hq, d)
        lse[a:b] = l_.permute(2, 0, 1).reshape(b - a, hq)
    return out, lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """outs [K, T, H, D], lses [K, T, H] (fp32, K partials over disjoint keys) -> out [T, H, D], lse [T, H]."""
    lse = torch.logsumexp(lses, dim=0)  # [T, H]; -inf where no partial saw a key
    w = torch.exp(lses - torch.where(torch.isinf(lse), 0.0, lse))  # [K, T, H]; 0 for empty partials
    return (w.unsqueeze(-1) * outs).sum(0), lse


def merge_into(acc: tuple[torch.Tensor, torch.Tensor], part: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Fold a partial (out [T, H, D], lse [T, H]) into the accumulator acc, in place."""
    out, lse = merge_partials(torch.stack([acc[0], part[0]]), torch.stack([acc[1], part[1]]))
    acc[0].copy_(out)
    acc[1].copy_(lse)


def visible_mask(q_pos: torch.Tensor, q_seq: torch.Tensor, k_pos: torch.Tensor, k_seq: torch.Tensor,
                 window: int | None = None) -> torch.Tensor:
    """[Tq, M] True where key (k_seq, k_pos) is visible to query (q_seq, q_pos): same sequence, causal, window."""
    mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


@dataclass(frozen=True)
class LinkFigures:
    """Measured between cp ranks: one message's latency, the link's bandwidth, the attention's throughput."""

    latency_s: float
    bandwidth_bytes_per_s: float
    attention_flops_per_s: float


def choose_ring(new_tokens: int, cached_tokens: int, cp: int, q_heads: int, kv_heads: int, head_dim: int,
                elem_bytes: int, link: LinkFigures | None) -> str:
    """"pass-kv" or "pass-q" for a prefill of T new tokens over P cached ones on N ranks (paper, Algorithm 1).

    pass-KV when either holds, else pass-Q:
      (1) its transfer hides under compute: one ring step sends a KV block of (T + P) / N tokens,
          t_kv = latency + (T + P) / N * 2 * NKV * D * e / BW, while attending T / N queries to it takes
          t_attn = 4 * (T / N) * ((T + P) / N) * NH * D / C flops/s; pass-KV if t_kv <= t_attn. With latency 0
          this is the paper's T >= N * C * NKV * e / (2 * NH * BW).
      (2) its message is no larger than pass-Q's: (T + P) * 2 * NKV <= T * NH, i.e. T / (T + P) >= 2 * NKV / NH.
    A prefix-cache hit raises P, which favours pass-Q. Without link figures only (2) decides.
    """
    t, p = new_tokens, cached_tokens
    if t <= 0:
        return "pass-q"
    if t * q_heads >= 2 * kv_heads * (t + p):
        return "pass-kv"
    if link is not None:
        t_kv = link.latency_s + (t + p) / cp * 2 * kv_heads * head_dim * elem_bytes / link.bandwidth_bytes_per_s
        t_attn = 4 * (t / cp) * ((t + p) / cp) * q_heads * head_dim / link.attention_flops_per_s
        if t_kv <= t_attn:
            return "pass-kv"
    return "pass-q"
