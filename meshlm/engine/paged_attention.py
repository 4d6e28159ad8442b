"""Paged attention for mixed batches (prefill chunks and decodes in one step).

The step's tokens are flattened into one row [1, T]. Each layer rotates q and k (RoPE) and writes this
step's K/V into the pool slots of its block table, in one call (kernels.rope_store), then attends.
Decodes (one new token each) go together to the C++ kernel of paged_decode.cpp (CPU only), which reads
each sequence's K/V in place in the pool; on CUDA, or without the kernel, they are gathered
(index_select) into one padded batch for SDPA. A prompt's first chunk attends to its own K/V from this
step; a later chunk gathers its earlier context from the pool.

The pools are torch.empty: a page of memory is touched (and counted in the rank's RSS) only when a block
on it is first written. Invariant: every slot attention reads was written, in this step or an earlier
one; padding of the gathered batch repeats a sequence's own slot, so garbage in unwritten slots never
reaches a sum (a masked NaN would still poison it: 0 * NaN = NaN).

A short run of new tokens after cached context that samples every row (at most DECODE_ROWS: a speculative
step's last token and its proposals; a prompt chunk after a prefix hit samples only its last row and stays a
prefill) goes row by row through the decode path, each row over the context up to its own position (the
step's K/V is written before attention). Row i then sees exactly what a decode at that position sees, summed
by the same kernel, so verifying k proposals gives the logits of k + 1 plain decode steps: greedy speculation
matches greedy decoding bit for bit, not only up to rounding (which quantized activations would amplify).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshlm.engine import paged_decode
from meshlm.kernels import rope_store
from meshlm.kernels.decode import DecodeStack, LayerWeights, decode_stack
from meshlm.models.layers import sdpa, visible_keys

DECODE_ROWS = 17  # new tokens after cached context taken row by row as decodes: 1 + up to 16 proposals


@dataclass(frozen=True)
class SeqInput:
    """One sequence's share of a step: tokens[start : start + n] sit at flat offset `offset`."""

    offset: int
    start: int  # position of the first new token (= tokens already cached)
    n: int
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class StepInput:
    """Everything a rank needs to run one step (broadcast from the driver; plain data)."""

    token_ids: tuple[int, ...]  # [T] flattened new tokens of every sequence
    seqs: tuple[SeqInput, ...]
    sample_offsets: tuple[int, ...]  # flat indices whose next token is wanted
    full_rows: tuple[int, ...] = ()  # indices into sample_offsets whose whole logits row comes back too
    seq_ids: tuple[str, ...] = ()  # debug (MESHLM_CHECK_POSITIONS=1): each seq's request id, for the ledger


@dataclass
class _Prefill:
    """One prompt chunk: queries at flat [offset, offset + n); keys from the step (slots None) or the pool."""

    offset: int
    n: int
    slots: torch.Tensor | None  # [ctx] pool slots of the whole context when the chunk is not the first
    mask: torch.Tensor | None  # [n, ctx] visible keys, None for plain causal


class PagedKVCache:
    """K/V pools [L_local, num_blocks * block_size, Hkv_local, D] and the per-step attention plan."""

    def __init__(self, layer_ids: list[int], num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", window: int | None = None) -> None:
        shape = (len(layer_ids), num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # untouched until written (see above)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.device = self.k.device
        # layer id -> its pools' views (k [slots, Hkv, D], v [slots, Hkv, D]), made once
        self.pools = {lid: (self.k[i], self.v[i]) for i, lid in enumerate(layer_ids)}
        self.block_size = block_size
        self.window = window  # sliding attention window (Mistral), None = global
        self.scale = 1.0 / math.sqrt(head_dim)
        # fp32 and bf16 pools (the kernel reads bf16 rows into fp32 sums; against fp32, bf16 decoding through
        # it is as close as through SDPA: tests/unit/test_models.py::test_bfloat16_close_to_float32).
        use_kernel = self.k.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        self.kernel = paged_decode.kernel() if use_kernel else None
        self.stack: DecodeStack | None = None  # the whole-stack decode op (set by the runner where it applies)
        self.stack_layers_run = 0  # decoder layers run through the whole-stack op (the heartbeat's progress)
        self.layers_op = None  # the model's hook for this step: run_stack on an all-decode step with a stack

    def _slots(self, table: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def _first_visible(self, ctx: int) -> int:
        return 0 if self.window is None else max(0, ctx - self.window)

    def rows(self, step: StepInput) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The token ids this rank computes and the flat rows it samples: the whole step."""
        return step.token_ids, step.sample_offsets

    def prepare(self, step: StepInput) -> torch.Tensor:
        """Plan attention for a step; returns positions [1, T]. Makes a few tensors per step (none per layer)."""
        dev, bs = self.device, self.block_size
        positions: list[int] = []
        writes: list[int] = []  # pool slot of each new token
        self.prefills: list[_Prefill] = []
        dec_idx, dec_tables, dec_first, dec_len = [], [], [], []
        sampled = set(step.sample_offsets)  # a verification run samples every row; a prompt chunk only its last
        for s in step.seqs:
            positions.extend(range(s.start, s.start + s.n))
            writes.extend(s.block_table[p // bs] * bs + p % bs for p in range(s.start, s.start + s.n))
            ctx = s.start + s.n
            if s.n == 1 or (s.start and s.n <= DECODE_ROWS and all(s.offset + i in sampled for i in range(s.n))):
                for i in range(s.n):  # row i attends to positions < s.start + i + 1, as a decode there would
                    dec_idx.append(s.offset + i)
                    dec_tables.append(s.block_table)
                    dec_first.append(self._first_visible(s.start + i + 1))
                    dec_len.append(s.start + i + 1)
                continue
            mask = None
            if s.start or (self.window is not None and ctx > self.window):
                mask = visible_keys(torch.arange(s.start, ctx, device=dev)[None], ctx, self.window)[0]  # [n, ctx]
            slots = self._slots(s.block_table, 0, ctx).to(dev) if s.start else None
            self.prefills.append(_Prefill(s.offset, s.n, slots, mask))
        self.write_slots = torch.tensor(writes, dtype=torch.long, device=dev)  # [T]
        self.all_decode = len(dec_idx) == len(step.token_ids)
        self.layers_op = self.run_stack if self.all_decode and self.stack is not None else None
        if not self.all_decode:
            self.dec_idx = torch.tensor(dec_idx, dtype=torch.long, device=dev)
        if dec_idx:
            self._plan_decode(dec_tables, dec_first, dec_len)
        return torch.tensor([positions], dtype=torch.long, device=dev)

    def _plan_decode(self, tables: list[tuple[int, ...]], first: list[int], lens: list[int]) -> None:
        if self.kernel is not None:  # reads tokens [first, len) of each table only: the padding is never read
            width = max(len(t) for t in tables)
            self.dec_tables = torch.tensor([t + (0,) * (width - len(t)) for t in tables], dtype=torch.long)
            self.dec_first = torch.tensor(first, dtype=torch.long)
            self.dec_len = torch.tensor(lens, dtype=torch.long)
            return
        # PyTorch path: visible slots of every decode, padded into one batch [Bd, Tmax] with a length mask.
        # A row is padded with its own last slot (written), never with a slot no one has written.
        slots = [self._slots(t, a, b) for t, a, b in zip(tables, first, lens)]
        longest = max(len(x) for x in slots)
        self.dec_slots = torch.stack([F.pad(x, (0, longest - len(x)), value=int(x[-1])) for x in slots]).to(self.device)
        n = torch.tensor([len(x) for x in slots])
        self.dec_mask = None if int(n.min()) == longest else (
            torch.arange(longest)[None, :] < n[:, None])[:, None, None, :].to(self.device)  # [Bd, 1, 1, Tmax]

    def use_stack(self, layers: list[LayerWeights | None], eps: float) -> None:
        """Take all-decode steps through the whole-stack op over these layers (one per pool, in order)
        where it applies (kernels/decode.py says when); the per-op path otherwise."""
        if self.kernel is not None:  # the paged decode kernel plans the decode tables the op reads
            self.stack = decode_stack(layers, self.k, self.v, self.k.shape[-1], self.block_size, eps, self.scale)

    def run_stack(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Every layer over an all-decode step: h [1, T, H], cos/sin [1, T, 1, D] -> [1, T, H]."""
        out = self.stack(h, cos, sin, self.write_slots, self.dec_tables, self.dec_first, self.dec_len)
        self.stack_layers_run += len(self.k)  # layers run in the op (no module hook sees them): a progress count
        return out

    def _decode(self, q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
        """q [Bd, Hq, D] -> [Bd, Hq, D] over each decode's cached context."""
        if self.kernel is not None:
            return self.kernel(q, kp, vp, self.dec_tables, self.dec_first, self.dec_len, self.block_size,
                               self.scale)
        bd, tmax = self.dec_slots.shape
        flat = self.dec_slots.view(-1)
        kd = kp.index_select(0, flat).view(bd, tmax, *kp.shape[1:]).transpose(1, 2)  # [Bd, Hkv, Tmax, D]
        vd = vp.index_select(0, flat).view(bd, tmax, *vp.shape[1:]).transpose(1, 2)
        return sdpa(q.unsqueeze(2), kd, vd, self.dec_mask).squeeze(2)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
        """q [1, T, Hq*D], k/v [1, T, Hkv*D], cos/sin [1, T, 1, D] -> [1, T, Hq*D]; RoPE and the K/V write first."""
        kp, vp = self.pools[layer]  # [slots, Hkv, D]
        q0, k0 = rope_store(q, k, v, cos, sin, kp, vp, self.write_slots)  # [T, Hq, D], [T, Hkv, D]
        if self.all_decode:
            return self._decode(q0, kp, vp).reshape(q.shape)
        out = torch.empty_like(q0)  # [T, Hq, D]
        if len(self.dec_idx):
            out.index_copy_(0, self.dec_idx, self._decode(q0.index_select(0, self.dec_idx), kp, vp))
        for p in self.prefills:
            qp = q0[p.offset:p.offset + p.n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if p.slots is None:  # the first chunk: its keys are this step's
                kk, vv = k0[p.offset:p.offset + p.n], v[0, p.offset:p.offset + p.n].view(p.n, -1, k0.shape[-1])
            else:
                kk, vv = kp.index_select(0, p.slots), vp.index_select(0, p.slots)  # [ctx, Hkv, D]
            o = sdpa(qp, kk.transpose(0, 1).unsqueeze(0), vv.transpose(0, 1).unsqueeze(0), p.mask,
                     causal=p.mask is None)
            out[p.offset:p.offset + p.n] = o[0].transpose(0, 1)
        return out.view(q.shape)
