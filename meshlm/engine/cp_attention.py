"""The attention backend of a context-parallel rank: the step's tokens split across cp ranks, KV sharded.

Every cp rank receives the same StepInput and derives its share (parallel/context.py): a sequence with several
new tokens (a prompt or a chunk of one) is sharded, rank i computing chunks i and 2N-1-i of it; a sequence
with one new token (a decode), or with several of which more than the last is sampled (a speculative
verification), is replicated, every rank computing all of it. K/V are stored round-robin by position
(p on rank p % N, kv_slot), whichever rank computed them. Per layer:

  replicated rows  the owner writes the new token; every rank attends to its shard; partials all-gathered
                   and merged by LSE. On the CPU the shard is read in place by the paged decode kernel:
                   position p sits at local index p // N of the sequence's own block table (kv_slot), so
                   a row at position q attends local indices [first, len) of that table, those of the
                   visible positions p = i * N + r (an empty range gives lse -inf). Elsewhere the shard's
                   slots are gathered and attended under a visibility plan.
  sharded rows     pass-KV: each rank's block (its cached shard and its new K/V) travels the ring, every
                   rank storing the tokens it owns as blocks pass; or pass-Q: new K/V go to their owners
                   (all-to-all), queries travel the ring, partial outputs come home (all-to-all) and merge.

The ring is chosen per step (parallel/context.choose_ring) from the step's new and cached prompt tokens and
the link figures measured at allocation; every rank computes the same choice. The sampled rows (the last
token of each sequence) are always on cp rank 0, which alone computes logits.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from meshlm.engine import paged_decode
from meshlm.engine.paged_attention import PagedKVCache, StepInput
from meshlm.kernels import apply_rope
from meshlm.parallel.comm import Comm
from meshlm.parallel.context import (
    LinkFigures,
    choose_ring,
    kv_slot,
    owned_slots,
    partial_attention,
    plan_attention,
    shard_offsets,
    visible_mask,
)
from meshlm.parallel.ring import all_to_all_v, merge_ranks, ring_pass_kv, ring_pass_q

log = logging.getLogger(__name__)


def _long(x: list[int], dev: torch.device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long, device=dev)


class ContextParallelKVCache(PagedKVCache):
    """This cp rank's K/V pools (its shard of every sequence) and the per-step plan of its rows."""

    def __init__(self, layer_ids: list[int], num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, window: int | None, comm: Comm, ring: str,
                 link: LinkFigures | None, q_heads: int, announce: bool = False) -> None:
        super().__init__(layer_ids, num_blocks, block_size, kv_heads, head_dim, dtype, device, window)
        self.comm, self.ring, self.link, self.q_heads, self.kv_heads = comm, ring, link, q_heads, kv_heads
        self.head_dim, self.elem = head_dim, self.k.element_size()
        self.announce = announce  # log each choice (one rank of the group)
        self.choices: Counter[str] = Counter()  # ring choices of the prefills so far
        self.partial = paged_decode.kernel_lse() if self.kernel is not None else None  # the in-place shard walk

    def rows(self, step: StepInput) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """This rank's token ids and the local rows to sample (rank 0 holds them all; the others none)."""
        return self.token_ids, self.sample_rows

    def _owned(self, table: tuple[int, ...], stop: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return owned_slots(table, stop, self.block_size, self.comm.size, rank)

    def prepare(self, step: StepInput) -> torch.Tensor:
        """Plan this rank's rows, writes, ring blocks and attention plans for a step; returns positions [1, T_local]."""
        n, r, bs, dev = self.comm.size, self.comm.index, self.block_size, self.device
        tokens, pos, local_of = [], [], {}
        rep = {"rows": [], "pos": [], "seq": [], "wrows": [], "wslots": []}
        rep_keys: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (slots, positions, seq) per sequence
        rep_tables, rep_first, rep_len = [], [], []  # per replicated row: its local range of its block table
        new_pos, new_seq = [[] for _ in range(n)], [[] for _ in range(n)]  # rank j's sharded tokens, its order
        cached: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]  # rank j's cached (pos, seq)
        cached_slots, shard, sh_rows = [], [], []
        new_total = cached_total = 0
        sampled = set(step.sample_offsets)
        for si, s in enumerate(step.seqs):
            ctx = s.start + s.n
            # Replicated: one new token, or several of which more than the last is sampled (a verification).
            if s.n == 1 or any(o in sampled for o in range(s.offset, s.offset + s.n - 1)):
                for i in range(s.n):
                    local_of[s.offset + i] = len(tokens)
                    rep["rows"].append(len(tokens))
                    tokens.append(step.token_ids[s.offset + i])
                    pos.append(s.start + i)
                    rep["pos"].append(s.start + i)
                    rep["seq"].append(si)
                    if (s.start + i) % n == r:
                        rep["wrows"].append(rep["rows"][-1])
                        rep["wslots"].append(kv_slot(s.start + i, s.block_table, bs, n))
                    # local indices i' of visible positions i' * n + r in [lo, q]: from ceil((lo - r) / n), >= 0
                    # as r < n, to the count of those <= q
                    q_pos, lo = s.start + i, self._first_visible(s.start + i + 1)
                    rep_tables.append(s.block_table)
                    rep_first.append(-((r - lo) // n))
                    rep_len.append((q_pos - r + n) // n)
                if self.partial is None:
                    p, slots = self._owned(s.block_table, ctx, r)
                    rep_keys.append((slots, p, torch.full_like(p, si)))
                continue
            new_total += s.n
            cached_total += s.start
            for j in range(n):
                offs = shard_offsets(s.n, n, j)
                new_pos[j].extend(s.start + o for o in offs)
                new_seq[j].extend([si] * len(offs))
                p, slots = self._owned(s.block_table, s.start, j)
                cached[j].append((p, torch.full_like(p, si)))
                if j == r:
                    cached_slots.append(slots)
                    for o in offs:
                        local_of[s.offset + o] = len(tokens)
                        sh_rows.append(len(tokens))
                        tokens.append(step.token_ids[s.offset + o])
                        pos.append(s.start + o)
            p, slots = self._owned(s.block_table, ctx, r)
            shard.append((slots, p, torch.full_like(p, si)))
        self.token_ids = tuple(tokens)
        if r == 0:
            missing = [o for o in step.sample_offsets if o not in local_of]
            assert not missing, f"sampled rows {missing} are not on cp rank 0 (one sampled row per sequence)"
            self.sample_rows = tuple(local_of[o] for o in step.sample_offsets)
        else:
            self.sample_rows = ()
        self.rep = None
        if rep["rows"]:
            if self.partial is not None:  # the kernel reads [first, len) of each row's table: padding never read
                width = max(len(t) for t in rep_tables)
                rep.update(tables=[t + (0,) * (width - len(t)) for t in rep_tables], first=rep_first, len=rep_len)
            self.rep = {k: _long(v, dev) for k, v in rep.items()}
        if rep["rows"] and self.partial is None:  # gathered: this rank's slots of the rows' sequences, a plan
            kslots, kpos, kseq = (torch.cat(x).to(dev) for x in zip(*rep_keys))
            self.rep["kslots"] = kslots
            self.rep_plan = plan_attention(visible_mask(self.rep["pos"], self.rep["seq"], kpos, kseq.to(dev),
                                                         self.window))
        self.mode = None
        if new_total:
            cat = [tuple(torch.cat(x).to(dev) for x in zip(*c)) for c in cached]  # per rank: (pos, seq)
            self._plan_sharded(step, new_pos, new_seq, cat, torch.cat(cached_slots).to(dev),
                               tuple(torch.cat(x).to(dev) for x in zip(*shard)), sh_rows, new_total, cached_total)
        return torch.tensor([pos], dtype=torch.long, device=dev)

    def _plan_sharded(self, step: StepInput, new_pos: list[list[int]], new_seq: list[list[int]],
                      cached: list[tuple[torch.Tensor, torch.Tensor]], cached_slots: torch.Tensor,
                      shard: tuple[torch.Tensor, torch.Tensor, torch.Tensor], sh_rows: list[int],
                      new_total: int, cached_total: int) -> None:
        n, r, bs, dev = self.comm.size, self.comm.index, self.block_size, self.device
        self.mode = self.ring if self.ring != "auto" else choose_ring(
            new_total, cached_total, n, self.q_heads, self.kv_heads, self.head_dim, self.elem, self.link)
        self.choices[self.mode] += 1
        if self.announce:
            log.info("cp=%d prefill of %d new tokens over %d cached: %s%s", n, new_total, cached_total, self.mode,
                     "" if self.ring == "auto" else " (--cp-ring)")
        self.sh_rows = _long(sh_rows, dev)
        qpos, qseq = _long(new_pos[r], dev), _long(new_seq[r], dev)
        # (index into rank j's new tokens, slot) of those this rank owns: stored as j's block passes (pass-KV)
        # or when they arrive (pass-Q).
        self.store = []
        for j in range(n):
            idx = [i for i, p in enumerate(new_pos[j]) if p % n == r]
            slots = [kv_slot(new_pos[j][i], step.seqs[new_seq[j][i]].block_table, bs, n) for i in idx]
            self.store.append((_long(idx, dev), _long(slots, dev)))
        if self.mode == "pass-kv":
            self.cached_slots = cached_slots
            self.sizes = [len(cached[j][0]) + len(new_pos[j]) for j in range(n)]
            self.store = [(i + len(cached[j][0]), s) for j, (i, s) in enumerate(self.store)]  # index in block j
            self.plans = [plan_attention(visible_mask(qpos, qseq, torch.cat([cached[j][0], _long(new_pos[j], dev)]),
                                                      torch.cat([cached[j][1], _long(new_seq[j], dev)]), self.window))
                          for j in range(n)]
        else:
            self.send_idx = [_long([i for i, p in enumerate(new_pos[r]) if p % n == o], dev) for o in range(n)]
            self.recv_rows = [len(i) for i, _ in self.store]
            self.q_rows = [len(new_pos[j]) for j in range(n)]
            self.shard_slots, kp, ks = shard
            self.plans = [plan_attention(visible_mask(_long(new_pos[j], dev), _long(new_seq[j], dev), kp, ks,
                                                      self.window)) for j in range(n)]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
        """q [1, T, Hq*D], k/v [1, T, Hkv*D] of this rank's rows -> [1, T, Hq*D]; stores the K/V it owns."""
        kp, vp = self.pools[layer]  # [slots, Hkv, D]
        t, d = q.shape[1], self.head_dim
        q0 = apply_rope(q.reshape(1, t, -1, d).contiguous(), cos, sin)[0]  # [T, Hq, D]
        k0 = apply_rope(k.reshape(1, t, -1, d).contiguous(), cos, sin)[0]  # [T, Hkv, D]
        v0 = v.reshape(t, -1, d)
        out = torch.empty_like(q0)
        rep = self.rep
        if rep is not None and len(rep["wrows"]):
            kp.index_copy_(0, rep["wslots"], k0.index_select(0, rep["wrows"]))
            vp.index_copy_(0, rep["wslots"], v0.index_select(0, rep["wrows"]))
        if self.mode is not None:
            qs, ks, vs = (x.index_select(0, self.sh_rows) for x in (q0, k0, v0))
            if self.mode == "pass-kv":
                own = torch.stack([torch.cat([kp.index_select(0, self.cached_slots), ks]),
                                   torch.cat([vp.index_select(0, self.cached_slots), vs])])  # [2, M_r, Hkv, D]

                def keep(j: int, block: torch.Tensor) -> None:
                    idx, slots = self.store[j]
                    kp.index_copy_(0, slots, block[0].index_select(0, idx))
                    vp.index_copy_(0, slots, block[1].index_select(0, idx))

                o, _ = ring_pass_kv(self.comm, qs, own, self.sizes, self.plans.__getitem__, self.scale, keep)
            else:
                sends = [torch.stack([ks.index_select(0, i), vs.index_select(0, i)], dim=1) for i in self.send_idx]
                got = all_to_all_v(self.comm, sends, self.recv_rows, op="kv_to_owner")  # [rows, 2, Hkv, D] each
                for (_, slots), kv in zip(self.store, got):
                    kp.index_copy_(0, slots, kv[:, 0])
                    vp.index_copy_(0, slots, kv[:, 1])
                kk, vv = kp.index_select(0, self.shard_slots), vp.index_select(0, self.shard_slots)
                o, _ = ring_pass_q(self.comm, qs, self.q_rows, kk, vv, self.plans.__getitem__, self.scale)
            out.index_copy_(0, self.sh_rows, o.to(out.dtype))
        if rep is not None:
            qr = q0.index_select(0, rep["rows"])  # [R, Hq, D]
            if self.partial is not None:  # this rank's shard read in place: o [R, Hq, D], lse [R, Hq] fp32
                o, lse = self.partial(qr, kp, vp, rep["tables"], rep["first"], rep["len"], self.block_size,
                                      self.scale)
            else:
                kk, vv = kp.index_select(0, rep["kslots"]), vp.index_select(0, rep["kslots"])
                o, lse = partial_attention(qr, kk, vv, self.rep_plan, self.scale)
            out.index_copy_(0, rep["rows"], merge_ranks(self.comm, o, lse).to(out.dtype))
        return out.view(1, t, -1)
