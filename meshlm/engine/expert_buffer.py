"""Expert buffering (--expert-budget BYTES): only a budget of experts resident, the rest read on demand.

Cold experts stay in host memory as the checkpoint holds them (memory-mapped, in the file's precision); a
resident expert is its three matrices in the compute dtype on the rank's device. One pool serves every MoE
layer: capacity = budget // bytes of one expert (w1 + w3 + w2), at least one. The policy is LFU with aging
(counts per (layer, expert) kept for cold experts too, halved every `period` accesses, so a hot expert that
was evicted comes back with its history, and old popularity fades); LRU is here as the baseline it is tested
against. After layer L's experts run, layer L+1's router is applied to the same hidden states and its top-k
experts are read ahead on a background thread (when they fit beside what is resident). The experts run in
ascending order on the same values as the one-device Experts, so outputs are identical with any budget.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from meshlm.errors import ConfigError
from meshlm.models.mixtral import Experts, SparseMoE, expert_ffn

Key = Hashable  # (layer, expert)


class LFU:
    """Least frequently used with aging; evicts the lowest count, the least recent among equals."""

    def __init__(self, capacity: int, period: int = 512) -> None:
        self.capacity, self.period, self.clock = capacity, period, 0
        self.count: dict[Key, float] = defaultdict(float)
        self.last: dict[Key, int] = {}
        self.resident: set[Key] = set()

    def access(self, key: Key, use: bool = True) -> tuple[bool, Key | None]:
        """Admit `key` (use=False: a prefetch, not counted as a use); (was resident, evicted key or None)."""
        if use:
            self.clock += 1
            self.count[key] += 1
            self.last[key] = self.clock
            if self.clock % self.period == 0:
                for k in self.count:
                    self.count[k] /= 2
        if key in self.resident:
            return True, None
        evicted = None
        if len(self.resident) >= self.capacity:
            evicted = min(self.resident, key=lambda k: (self.count[k], self.last.get(k, 0)))
            self.resident.remove(evicted)
        self.resident.add(key)
        return False, evicted


class LRU:
    """Least recently used (the baseline)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.resident: OrderedDict[Key, None] = OrderedDict()

    def access(self, key: Key, use: bool = True) -> tuple[bool, Key | None]:
        """Admit `key`; (was resident, evicted key or None)."""
        if key in self.resident:
            self.resident.move_to_end(key)
            return True, None
        evicted = self.resident.popitem(last=False)[0] if len(self.resident) >= self.capacity else None
        self.resident[key] = None
        return False, evicted


def hit_rate(policy, trace: list[Key]) -> float:
    """Fraction of the trace's accesses that found their key resident."""
    return sum(policy.access(k)[0] for k in trace) / max(1, len(trace))


class ExpertCache:
    """The resident experts of every MoE layer, within `capacity` experts; fetch(key) reads a cold one. Prefetches
    read on one background thread: their slot holds a Future until the expert is first used."""

    def __init__(self, capacity: int, fetch: Callable[[Key], tuple[torch.Tensor, ...]]) -> None:
        self.policy, self.fetch = LFU(capacity), fetch
        self.store: dict[Key, tuple[torch.Tensor, ...] | Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch")
        self.hits = self.misses = self.prefetched = 0
        self.fetch_seconds = self.wait_seconds = 0.0

    def get(self, key: Key) -> tuple[torch.Tensor, ...]:
        """(w1, w3, w2) of `key`: resident, or prefetched (waiting for the read if it is still running), or read
        now (a miss)."""
        hit, _ = self._admit(key, use=True)
        self.hits += hit
        self.misses += not hit
        got = self.store[key]
        if isinstance(got, Future):
            t0 = time.perf_counter()
            weights, seconds = got.result()
            self.wait_seconds += time.perf_counter() - t0
            self.fetch_seconds += seconds
            got = self.store[key] = weights
        return got

    def prefetch(self, keys: list[Key]) -> None:
        """Start reading cold `keys` ahead of use (at most capacity - 1 of them, so the pool never turns over)."""
        for key in keys[: max(0, self.policy.capacity - 1)]:
            if key not in self.store:
                self._admit(key, use=False)
                self.prefetched += 1

    def _admit(self, key: Key, use: bool) -> tuple[bool, Key | None]:
        hit, evicted = self.policy.access(key, use)
        if evicted is not None:
            del self.store[evicted]  # an evicted read still running finishes on its thread and is dropped
        if not hit and use:
            weights, seconds = self._read(key)
            self.store[key] = weights
            self.fetch_seconds += seconds
        elif not hit:
            self.store[key] = self.pool.submit(self._read, key)
        return hit, evicted

    def _read(self, key: Key) -> tuple[tuple[torch.Tensor, ...], float]:
        t0 = time.perf_counter()
        weights = self.fetch(key)
        return weights, time.perf_counter() - t0

    def snapshot(self) -> dict:
        """{"capacity", "resident", "hits", "misses", "hit_rate", "prefetched", "fetch_seconds", "wait_seconds"}
        (wait: time a use waited for its prefetch to finish)."""
        total = self.hits + self.misses
        return {"capacity": self.policy.capacity, "resident": len(self.store), "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "prefetched": self.prefetched, "fetch_seconds": self.fetch_seconds, "wait_seconds": self.wait_seconds}


class BufferedExperts(Experts):
    """Experts whose weights come from an ExpertCache; predicts and prefetches the next MoE layer's experts."""

    cache: ExpertCache
    layer_id: int
    next_moe: SparseMoE | None
    next_layer: int

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """As Experts.forward (same order, same values); then prefetch layer next_layer's predicted experts."""
        out = torch.zeros_like(x)
        for e in torch.unique(expert_ids).tolist():
            w1, w3, w2 = self.cache.get((self.layer_id, e))
            tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            ye = expert_ffn(x[tok], w1, w3, w2)  # [n_e, H]
            out.index_add_(0, tok, ye * weights[tok, slot, None].to(ye.dtype))
        if self.next_moe is not None:  # the next layer's router on these hidden states: its likely experts
            nxt = self.next_moe
            guess = torch.topk(nxt.router.forward(x), nxt.top_k, dim=-1).indices
            ids, n = torch.unique(guess, return_counts=True)
            self.cache.prefetch([(self.next_layer, int(e)) for e in ids[torch.argsort(n, descending=True)]])
        return out


def expert_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of one resident expert (w1 + w3 + w2) in `dtype`."""
    return 3 * cfg.hidden_size * cfg.expert_inter * torch.empty((), dtype=dtype).element_size()


def make_buffered(model: nn.Module, cfg, budget: int, dtype: torch.dtype,
                  read: Callable[[str, int], tuple[torch.Tensor, ...]]) -> ExpertCache:
    """Turn every (meta) Experts module into BufferedExperts over one ExpertCache of `budget` bytes; their
    weights are no longer parameters (the loader skips them). read(module name, expert) -> (w1, w3, w2)."""
    one = expert_bytes(cfg, dtype)
    if budget < one:
        raise ConfigError(f"--expert-budget {budget} bytes holds no expert: one takes {one} bytes "
                          f"({dtype}); give at least {one}.")
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]
    names = {int(name.split(".")[1]): f"{name}.experts" for name, _ in moes}
    cache = ExpertCache(budget // one, lambda key: read(names[key[0]], key[1]))
    for i, (name, moe) in enumerate(moes):
        ex = moe.experts
        for w in ("w1", "w3", "w2"):
            del ex._parameters[w]
        ex.__class__ = BufferedExperts
        ex.cache, ex.layer_id = cache, int(name.split(".")[1])
        object.__setattr__(ex, "next_moe", moes[i + 1][1] if i + 1 < len(moes) else None)  # not a submodule
        ex.next_layer = int(moes[i + 1][0].split(".")[1]) if i + 1 < len(moes) else -1
    return cache
