"""Ring attention over the context-parallel group: pass-KV, pass-Q, and the merge of replicated queries' partials.

Every rank knows every block's size, positions and sequence ids from the step plan (parallel/context.py), so
only K/V, Q and partial outputs travel. Each ring step posts the next block's transfer (Comm.exchange) and
attends to the block in hand meanwhile; the time a rank then still waits is the transfer not hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from meshlm.parallel.comm import Comm
from meshlm.parallel.context import AttnPlan, LinkFigures, merge_partials, partial_attention, plan_attention

Plans = Callable[[int], AttnPlan]  # block (source rank) -> its plan of visible [Tq, M]


def ring_pass_kv(comm: Comm, q: torch.Tensor, kv: torch.Tensor, sizes: list[int], plans: Plans, scale: float,
                 on_block: Callable[[int, torch.Tensor], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, Hq, D] stays; kv [2, M_r, Hkv, D] (this rank's block) visits every rank. sizes[j] = M_j.

    Step s holds rank (r - s) % N's block, posts it to r + 1 and receives the next from r - 1 while
    attending to it; on_block(j, kv_j) sees every block once (the caller stores what it owns).
    Returns out [Tq, Hq, D] fp32 and lse [Tq, Hq] fp32 over every block.
    """
    n, r = comm.size, comm.index
    outs, lses = [], []
    cur = kv
    for s in range(n):
        j = (r - s) % n
        ex, nxt = None, None
        if s < n - 1:
            nxt = kv.new_empty((2, sizes[(j - 1) % n], *kv.shape[2:]))
            ex = comm.exchange(cur, (r + 1) % n, nxt, (r - 1) % n, op="ring_kv")
        o, lse = partial_attention(q, cur[0], cur[1], plans(j), scale)
        outs.append(o)
        lses.append(lse)
        on_block(j, cur)
        if ex is not None:
            ex.wait()
            cur = nxt
    return merge_partials(torch.stack(outs), torch.stack(lses))


def all_to_all_v(comm: Comm, sends: list[torch.Tensor], recv_rows: list[int], op: str) -> list[torch.Tensor]:
    """Send sends[j] to rank j; receive recv_rows[j] rows (same trailing shape and dtype) from each j.

    Pairwise rounds: in round s rank r sends to r + s and receives from r - s.
    """
    n, r = comm.size, comm.index
    like = sends[r]
    out: list[torch.Tensor] = [like.new_empty(0)] * n
    out[r] = sends[r]
    for s in range(1, n):
        dst, src = (r + s) % n, (r - s) % n
        buf = like.new_empty((recv_rows[src], *like.shape[1:]))
        comm.exchange(sends[dst], dst, buf, src, op=op).wait()
        out[src] = buf
    return out


def ring_pass_q(comm: Comm, q: torch.Tensor, q_rows: list[int], k: torch.Tensor, v: torch.Tensor, plans: Plans,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T_r, Hq, D] visits every rank; k/v [S_r, Hkv, D] (this rank's shard of the context) stay.

    Step s attends rank (r - s) % N's queries to the local shard while the next queries travel; the partial
    outputs go home by all-to-all and merge there. q_rows[j] = T_j; plans(j) -> visible [T_j, S_r].
    Returns out [T_r, Hq, D] fp32 and lse [T_r, Hq] fp32.
    """
    n, r = comm.size, comm.index
    hq, d = q.shape[1], q.shape[2]
    parts: list[torch.Tensor] = [q.new_empty(0)] * n  # partial for rank j: [T_j, Hq, D + 1] fp32 (out | lse)
    cur = q
    for s in range(n):
        j = (r - s) % n
        ex, nxt = None, None
        if s < n - 1:
            nxt = q.new_empty((q_rows[(j - 1) % n], hq, d))
            ex = comm.exchange(cur, (r + 1) % n, nxt, (r - 1) % n, op="ring_q")
        o, lse = partial_attention(cur, k, v, plans(j), scale)
        parts[j] = torch.cat([o, lse.unsqueeze(-1)], dim=-1)
        if ex is not None:
            ex.wait()
            cur = nxt
    back = all_to_all_v(comm, parts, [q_rows[r]] * n, op="ring_q_out")  # every rank's partial for my queries
    both = torch.stack(back)  # [N, T_r, Hq, D + 1]
    return merge_partials(both[..., :d], both[..., d])


def merge_ranks(comm: Comm, o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Queries every rank holds (decodes): this rank's partial (o [T, Hq, D], lse [T, Hq] fp32, over its shard)
    all-gathered and merged by LSE -> out [T, Hq, D] fp32."""
    if comm.size == 1:
        return o
    mine = torch.cat([o, lse.unsqueeze(-1)], dim=-1).unsqueeze(0)  # [1, T, Hq, D + 1]
    every = comm.all_gather(mine, dim=0)  # [N, T, Hq, D + 1]
    d = o.shape[-1]
    return merge_partials(every[..., :d], every[..., d])[0]


def measure_link(comm: Comm, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> LinkFigures:
    """Latency and bandwidth of one ring hop and this rank's partial-attention throughput (tensors on `device`);
    cp rank 0's figures go to every rank, so every rank makes the same ring choice."""
    n, r = comm.size, comm.index
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def hop(numel: int, reps: int) -> float:
        send, recv = torch.zeros(numel, dtype=dtype, device=device), torch.empty(numel, dtype=dtype, device=device)
        comm.barrier()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            comm.exchange(send, (r + 1) % n, recv, (r - 1) % n, op="measure").wait()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[reps // 2]  # the median: one slow hop on a busy host does not set the figure

    small = hop(1, 8)
    big_bytes = 4 << 20
    big = hop(big_bytes // torch.empty((), dtype=dtype).element_size(), 5)
    tq, m = 128, 1024
    q = torch.randn(tq, q_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(m, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(m, kv_heads, head_dim, dtype=dtype, device=device)
    plan = plan_attention(torch.ones(tq, m, dtype=torch.bool, device=device))
    partial_attention(q, k, v, plan, 1.0)
    sync()
    t0 = time.perf_counter()
    partial_attention(q, k, v, plan, 1.0)
    sync()
    flops = 4 * tq * m * q_heads * head_dim / max(time.perf_counter() - t0, 1e-9)
    # bandwidth from the large hop less the latency, unless noise left too little of it to trust (then the whole
    # hop, latency included: a conservative figure)
    mine = LinkFigures(small, big_bytes / (big - small if big > 2 * small else big), flops)
    return comm.broadcast_object(mine, 0)
