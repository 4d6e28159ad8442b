"""Paged KV block bookkeeping: free list, ref counts, prefix caching by chained block hashes.

Pure CPU bookkeeping, no torch. A block holds `block_size` token slots of every layer's K and V. A full
block is identified by hash(previous block's hash, its token ids), so equal prefixes map to equal
chains and a later request reuses the blocks (ref count + 1) instead of recomputing them. Freed blocks
keep their hash until they are handed out again (least recently freed first), so a finished request's
prefix stays reusable while memory allows.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from meshlm.errors import RequestError


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Chained hash of a full block."""
    return hash((parent, tokens))


@dataclass
class CacheStats:
    """Counters the engine reports."""

    prefix_queries: int = 0  # full prompt blocks looked up
    prefix_hits: int = 0  # of those, found cached


class BlockManager:
    """Hands out KV blocks to sequences; the invariant: free + referenced == num_blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise RequestError("The KV cache budget gives no block at all; raise --kv-cache-mb.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stats = CacheStats()

    @property
    def num_free(self) -> int:
        """Blocks not referenced by any sequence (cached or empty)."""
        return len(self.free)

    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens slots."""
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed first
        h = self.hash_of[block]
        if h is not None and self.by_hash.get(h) == block:
            del self.by_hash[h]
        self.hash_of[block] = None
        self.ref[block] = 1
        return block

    def _reuse(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks for the longest full-block prefix of tokens (at least one token left over)."""
        out: list[int] = []
        parent = None
        limit = (len(tokens) - 1) // self.block_size  # the last token is always computed
        for i in range(limit):
            h = block_hash(parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]))
            self.stats.prefix_queries += 1
            block = self.by_hash.get(h)
            if block is None:
                break
            self.stats.prefix_hits += 1
            out.append(block)
            parent = h
        return out

    def allocate(self, table: list[int], cached: list[int], num_tokens: int) -> bool:
        """Extend an empty table with cached blocks, then fresh ones up to num_tokens slots."""
        assert not table
        need = self.blocks_for(num_tokens) - len(cached)
        reusable_free = sum(1 for b in cached if self.ref[b] == 0)
        if need > self.num_free - reusable_free:
            return False
        for b in cached:
            self._reuse(b)
            table.append(b)
        for _ in range(need):
            table.append(self._take())
        return True

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Make table hold num_tokens slots; False (and no change) when blocks run out."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            return False
        for _ in range(max(0, need)):
            table.append(self._take())
        return True

    def register_full(self, table: list[int], tokens: list[int], first: int, upto: int) -> None:
        """Hash blocks [first, upto) of table, whose slots are now computed, so others can reuse them."""
        parent = self.hash_of[table[first - 1]] if first > 0 else None
        for i in range(first, upto):
            h = block_hash(parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]))
            block = table[i]
            if self.hash_of[block] is None:
                self.hash_of[block] = h
                self.by_hash.setdefault(h, block)
            parent = h

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Keep the blocks holding slots [0, num_tokens) of table and free the rest (rejected proposals' KV).

        The freed blocks were never hashed (only computed, accepted tokens are); they go to the front of the
        free list, so blocks that still hold a cached prefix are handed out after them."""
        keep = self.blocks_for(num_tokens)
        for b in reversed(table[keep:]):
            assert self.hash_of[b] is None, "truncating a registered block"
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                self.free.move_to_end(b, last=False)
        del table[keep:]

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block of table (a finished, aborted or preempted sequence)."""
        for b in reversed(table):  # tail first: a prefix stays cached longest
            self.ref[b] -= 1
            assert self.ref[b] >= 0, "block released twice"
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()
