"""The block manager alone: free list and ref counts, chained prefix hashes, eviction order, refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlm.engine.kv_cache import BlockManager
from meshlm.errors import RequestError


def filled(bm: BlockManager, tokens: list[int]) -> list[int]:
    """A table holding tokens, computed and published as a sequence would be (cached prefix first)."""
    table: list[int] = []
    cached = bm.match_prefix(tokens)
    assert bm.allocate(table, cached, len(tokens))
    bm.register_full(table, tokens, len(cached), len(tokens) // bm.block_size)
    return table


def test_an_empty_pool_is_refused_with_the_fix():
    with pytest.raises(RequestError, match="--kv-cache-mb"):
        BlockManager(0, 16)


def test_allocate_grow_release_keep_free_plus_used_equal_to_the_pool():
    bm = BlockManager(5, 4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    a, b = [], []
    assert bm.allocate(a, [], 5) and a == [0, 1]  # fresh blocks in pool order
    assert bm.allocate(b, [], 8) and bm.num_free == 1 and bm.usage() == pytest.approx(0.8)
    assert bm.grow(a, 8) and a == [0, 1] and bm.num_free == 1  # still fits its 2 blocks
    assert bm.grow(a, 9) and len(a) == 3 and bm.num_free == 0
    assert not bm.grow(b, 9) and len(b) == 2  # refused without a change
    assert not bm.allocate(c := [], [], 1) and c == []
    bm.release(a)
    assert a == [] and bm.num_free == 3 and bm.ref == [0, 0, 1, 1, 0]
    bm.release(b)
    assert bm.num_free == 5 and bm.usage() == 0.0


def test_releasing_a_table_twice_is_caught():
    bm = BlockManager(2, 4)
    t = []
    bm.allocate(t, [], 4)
    copy = list(t)
    bm.release(t)
    with pytest.raises(AssertionError, match="released twice"):
        bm.release(copy)


def test_match_leaves_the_last_token_to_compute_and_counts_hits():
    bm = BlockManager(8, 2)
    filled(bm, [1, 2, 3, 4, 5, 6])  # three full blocks published
    queries, hits = bm.stats.prefix_queries, bm.stats.prefix_hits
    assert len(bm.match_prefix([1, 2, 3, 4, 5, 6])) == 2  # the whole prompt is cached: its last block is not
    assert len(bm.match_prefix([1, 2, 3, 4, 5, 6, 7])) == 3
    assert len(bm.match_prefix([1, 2, 9, 9, 5, 6, 7])) == 1  # stops at the first miss
    assert bm.match_prefix([1]) == [] and bm.match_prefix([9, 9, 9]) == []
    assert (bm.stats.prefix_queries - queries, bm.stats.prefix_hits - hits) == (2 + 3 + 2 + 0 + 1, 2 + 3 + 1)


def test_equal_blocks_after_different_prefixes_are_different_cache_entries():
    bm = BlockManager(8, 2)
    first = filled(bm, [1, 2, 7, 7])
    second = filled(bm, [3, 4, 7, 7])
    assert first[1] != second[1] and len(bm.by_hash) == 4  # (7, 7) twice, chained to different parents
    assert bm.match_prefix([3, 4, 7, 7, 0]) == second and bm.match_prefix([1, 2, 7, 7, 0]) == first
    assert bm.match_prefix([7, 7, 0]) == []


def test_blocks_published_one_at_a_time_chain_like_blocks_published_together():
    bm = BlockManager(8, 2)
    t: list[int] = []
    tokens = [1, 2, 3, 4, 5, 6]
    assert bm.allocate(t, [], 6)
    for i in range(3):  # a chunked prefill or a decode fills one block per step
        bm.register_full(t, tokens, i, i + 1)
    assert bm.match_prefix(tokens + [0]) == t


def test_shared_blocks_are_ref_counted_and_stay_cached_after_release():
    bm = BlockManager(6, 2)
    a = filled(bm, [1, 2, 3, 4, 5])
    cached = bm.match_prefix([1, 2, 3, 4, 9])
    b: list[int] = []
    assert bm.allocate(b, cached, 5)
    assert b[:2] == a[:2] and b[2] != a[2] and [bm.ref[x] for x in a] == [2, 2, 1]
    assert bm.num_free == 2  # 6 blocks - 3 of a - 1 fresh of b
    bm.release(a)
    assert [bm.ref[x] for x in b] == [1, 1, 1] and bm.num_free == 3
    bm.release(b)
    assert bm.num_free == 6
    assert bm.match_prefix([1, 2, 3, 4, 0]) == cached  # free, but still cached
    c: list[int] = []
    assert bm.allocate(c, cached, 5) and c[:2] == cached and bm.num_free == 3  # taken back off the free list


def test_allocate_does_not_count_a_free_cached_block_twice():
    bm = BlockManager(4, 2)
    bm.release(filled(bm, [1, 2, 3, 4, 5]))  # 3 blocks free but cached
    cached = bm.match_prefix([1, 2, 3, 4, 9])
    assert len(cached) == 2
    t: list[int] = []
    # 2 cached + 3 fresh = 5 blocks > 4: the cached ones are among the 4 free, so this cannot fit
    assert not bm.allocate(t, cached, 10) and t == [] and bm.num_free == 4 and bm.ref == [0] * 4
    assert bm.allocate(t, cached, 8) and bm.num_free == 0


def test_eviction_takes_the_least_recently_freed_block_and_a_freed_prefix_lasts_longest():
    bm = BlockManager(3, 2)
    bm.release(filled(bm, [1, 2, 3, 4, 5, 6]))  # freed tail first: the head block is evicted last
    t: list[int] = []
    assert bm.allocate(t, [], 2)  # one fresh block: the chain loses its tail
    assert len(bm.match_prefix([1, 2, 3, 4, 5, 6, 0])) == 2
    assert bm.grow(t, 6)  # two more: the chain is gone, head included
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 0]) == []
    assert set(bm.by_hash.values()).isdisjoint(t)  # a block handed out fresh is no cache entry


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 8), block_size=st.integers(1, 3), ops=st.lists(st.one_of(
    st.tuples(st.just("new"), st.lists(st.integers(0, 1), min_size=1, max_size=10)),
    st.tuples(st.just("grow"), st.integers(0, 9), st.integers(1, 4)),
    st.tuples(st.just("release"), st.integers(0, 9)),
), max_size=30))
def test_random_tables_keep_ref_counts_and_every_hit_holds_its_prefix(num_blocks, block_size, ops):
    """Ref counts equal the tables holding each block, free blocks are exactly the unreferenced ones, and a
    prefix hit only ever returns blocks whose contents are that prefix."""
    bm = BlockManager(num_blocks, block_size)
    seqs: list[tuple[list[int], list[int]]] = []  # (tokens, table), all computed and published
    content: dict[int, tuple[int, ...]] = {}  # block -> the token prefix through its last slot
    for op in ops:
        if op[0] == "new":
            tokens, table = list(op[1]), []
            cached = bm.match_prefix(tokens)
            for i, b in enumerate(cached):
                assert content[b] == tuple(tokens[:(i + 1) * block_size])
            if bm.allocate(table, cached, len(tokens)):
                bm.register_full(table, tokens, len(cached), len(tokens) // block_size)
                seqs.append((tokens, table))
        elif seqs and op[0] == "grow":
            tokens, table = seqs[op[1] % len(seqs)]
            before = len(tokens) // block_size
            more = tokens + [0] * op[2]
            if bm.grow(table, len(more)):
                tokens[:] = more
                bm.register_full(table, tokens, before, len(tokens) // block_size)
        elif seqs and op[0] == "release":
            bm.release(seqs.pop(op[1] % len(seqs))[1])
        for tokens, table in seqs:  # what the model wrote into each of its full blocks
            for i in range(len(tokens) // block_size):
                if bm.ref[table[i]] == 1:
                    content[table[i]] = tuple(tokens[:(i + 1) * block_size])
        holders = [0] * num_blocks
        for _, table in seqs:
            for b in table:
                holders[b] += 1
        assert bm.ref == holders
        assert set(bm.free) == {b for b in range(num_blocks) if holders[b] == 0}
        assert all(bm.hash_of[b] == h for h, b in bm.by_hash.items())
    for _, table in seqs:
        bm.release(table)
    assert bm.num_free == num_blocks
