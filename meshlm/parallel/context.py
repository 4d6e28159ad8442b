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


@dataclass(frozen=True)
class Segment:
    """Queries [a, b) attend keys [lo, hi): all of them (mask None, causal False), top-left causal, or the
    additive fp32 mask [b - a, hi - lo] (0 visible, -inf not); blind [b - a] marks rows that see none of them."""

    a: int
    b: int
    lo: int
    hi: int
    causal: bool = False
    mask: torch.Tensor | None = None
    blind: torch.Tensor | None = None


@dataclass(frozen=True)
class AttnPlan:
    """A visibility mask [rows, keys] cut once per step into segments: invisible (query, key) pairs are skipped,
    fully visible and diagonal ones need no mask; only the rest keep one."""

    rows: int
    keys: int
    segments: tuple[Segment, ...]


def _runs(flags: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Maximal runs [a, b) of equal values in a 1-D bool tensor, with the value."""
    if len(flags) == 0:
        return []
    cut = (torch.nonzero(flags[1:] != flags[:-1]).flatten() + 1).tolist()
    edges = [0, *cut, len(flags)]
    vals = flags[edges[:-1]].tolist()
    return [(edges[i], edges[i + 1], vals[i]) for i in range(len(vals))]


def _segment(visible: torch.Tensor, a: int, b: int, lo: int, hi: int) -> Segment:
    block = visible[a:b, lo:hi]
    if bool(block.all()):
        return Segment(a, b, lo, hi)
    if b - a == hi - lo and torch.equal(block, torch.ones_like(block).tril()):
        return Segment(a, b, lo, hi, causal=True)
    blind = ~block.any(1)
    mask = torch.zeros(block.shape, dtype=torch.float32, device=block.device).masked_fill(~block, -math.inf)
    return Segment(a, b, lo, hi, mask=mask, blind=blind if bool(blind.any()) else None)


def plan_attention(visible: torch.Tensor, tile: int = 256, min_full: int = 64) -> AttnPlan:
    """Cut visible [Tq, M] into segments: queries in tiles of at most `tile` rows with similar key spans, each
    tile's span of keys split into its fully visible columns (when at least min_full wide) and the rest."""
    tq, m = visible.shape
    if tq == 0 or m == 0:
        return AttnPlan(tq, m, ())
    any_ = visible.any(1)
    first = torch.where(any_, visible.int().argmax(1), m).tolist()
    last = torch.where(any_, m - visible.flip(1).int().argmax(1), 0).tolist()  # one past the last visible key
    segs: list[Segment] = []
    a = 0
    while a < tq:
        lo, hi, work, b = first[a], last[a], max(0, last[a] - first[a]), a + 1
        while b < tq and b - a < tile:  # grow while the tile's span stays within twice its rows' own spans
            nlo, nhi = min(lo, first[b]), max(hi, last[b])
            nwork = work + max(0, last[b] - first[b])
            if (b + 1 - a) * max(0, nhi - nlo) > 2 * nwork + (b + 1 - a) * min_full:
                break
            lo, hi, work, b = nlo, nhi, nwork, b + 1
        if hi > lo:
            full = visible[a:b, lo:hi].all(0)
            spans = [(x, y) for x, y, v in _runs(full) if v and y - x >= min_full]
            cuts = [lo, *(c for x, y in spans for c in (lo + x, lo + y)), hi]
            w = b - a  # a diagonal at the right end: give it its square (the full span before it yields a column)
            if len(cuts) > 2 and cuts[-3] <= hi - w < cuts[-2] and torch.equal(
                    visible[a:b, hi - w:hi], torch.ones(w, w, dtype=torch.bool, device=visible.device).tril()):
                cuts[-2] = hi - w
            for x, y in zip(cuts[:-1], cuts[1:]):
                if y > x:
                    segs.append(_segment(visible, a, b, x, y))
        a = b
    return AttnPlan(tq, m, tuple(segs))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segment, scale: float,
            fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Hkv, g, t, D], k/v [Hkv, 1, m, D] fp32 -> out [Hkv, g, t, D], lse [Hkv, g, t] (lse of blind rows wrong)."""
    if fused:
        hkv, g = q.shape[:2]
        ke, ve = k.expand(hkv, g, *k.shape[2:]), v.expand(hkv, g, *v.shape[2:])
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, ke, ve, 0.0, seg.causal, attn_mask=seg.mask, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale  # [Hkv, g, t, m]
    if seg.causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    elif seg.mask is not None:
        s = s + seg.mask
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1)) @ v, lse


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttnPlan, scale: float,
                      fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, Hq, D], k/v [M, Hkv, D], plan of visible [Tq, M] -> out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32.

    Softmax attention over the visible keys only; a query with no visible key gets out 0 and lse -inf. Each
    segment goes through the fused CPU flash kernel (fused, the default on CPU) or a dense fp32 path (other
    devices); segments of the same queries merge by LSE.
    """
    tq, hq, d = q.shape
    m, hkv = k.shape[0], k.shape[1]
    assert (tq, m) == (plan.rows, plan.keys), f"plan for {plan.rows}x{plan.keys}, attention {tq}x{m}"
    g = hq // hkv
    fused = q.device.type == "cpu" if fused is None else fused
    out = torch.zeros(tq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((tq, hq), -math.inf, dtype=torch.float32, device=q.device)
    if not plan.segments:
        return out, lse
    qf = q.float().view(tq, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, g, Tq, D]
    kf = k.float().transpose(0, 1).unsqueeze(1)  # [Hkv, 1, M, D], strided views (the kernel takes strides)
    vf = v.float().transpose(0, 1).unsqueeze(1)
    done = -1  # rows [a, b) of the last segment written: a later segment of the same rows merges into them
    for seg in plan.segments:
        o, l_ = _attend(qf[:, :, seg.a:seg.b], kf[:, :, seg.lo:seg.hi], vf[:, :, seg.lo:seg.hi], seg, scale, fused)
        o, l_ = o.permute(2, 0, 1, 3).reshape(-1, hq, d), l_.permute(2, 0, 1).reshape(-1, hq)
        if seg.blind is not None:  # rows that see no key here: the kernel's out/lse there are not 0/-inf
            o = o.masked_fill(seg.blind[:, None, None], 0.0)
            l_ = l_.masked_fill(seg.blind[:, None], -math.inf)
        if done == seg.a:
            merge_into((out[seg.a:seg.b], lse[seg.a:seg.b]), (o, l_))
        else:
            out[seg.a:seg.b], lse[seg.a:seg.b] = o, l_
        done = seg.a
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
