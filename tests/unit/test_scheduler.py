"""The scheduler without a model: admission, token budget, preemption, prefix hits, abort, timeouts, pp groups,
prompt chunks in flight back to back.

`Driver` runs a Scheduler the way LLMEngine does (plan up to `depth` steps, finish the oldest: `computed`,
then append a sampled token and finish at max_new). Its fake model keeps a KV pool: a step writes each
granted token's K/V into its slot, modelled as the sequence up to that token (a token's K/V depends on its
position and on every token before it), and checks that every earlier slot of the sequence holds that
sequence's K/V, which is what paged attention reads. So a wrong block table, a prefix hit on the wrong block
or a write into a shared block fails here; the sampled token is a function of the whole sequence, so every
request must end with the tokens it would get alone.
"""

from __future__ import annotations

import time
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlm.config import ModelConfig, SamplingParams
from meshlm.engine.kv_cache import BlockManager
from meshlm.engine.request import Request, Status
from meshlm.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, SchedulerOutput
from meshlm.errors import ConfigError, RequestError

VOCAB = 5  # few token ids: random prompts share prefixes often


def next_token(tokens: list[int]) -> int:
    """The fake model's greedy choice: a deterministic function of the whole sequence."""
    return hash(tuple(tokens)) % VOCAB


def alone(prompt: list[int], max_new: int) -> list[int]:
    """The tokens a request ends with when it runs by itself."""
    tokens = list(prompt)
    for _ in range(max_new):
        tokens.append(next_token(tokens))
    return tokens


class Driver:
    """LLMEngine's loop over a Scheduler and a BlockManager, with a fake model that checks the KV it reads."""

    def __init__(self, num_blocks: int = 16, block_size: int = 4, depth: int = 1, chunk: int | None = None,
                 **cfg: int) -> None:
        """chunk: cut every prefill into pieces of `chunk` tokens, as the engine cuts prompts at pp > 1."""
        self.blocks = BlockManager(num_blocks, block_size)
        plan = (lambda a, b: (*range(a + chunk, b, chunk), b)) if chunk else None
        self.sched = Scheduler(SchedulerConfig(**cfg), self.blocks, plan)
        self.depth = depth
        self.inflight: deque[tuple[SchedulerOutput, list[tuple[int, ...]]]] = deque()
        # (block, slot) -> the tokens up to and including the one whose K/V the slot holds: a token's K/V
        # depends on its position and on every token before it
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self.reqs: list[Request] = []

    def add(self, prompt: list[int], max_new: int = 4) -> Request:
        """Queue a request as LLMEngine.add_request does."""
        req = Request(f"r{len(self.reqs)}", list(prompt), SamplingParams(max_tokens=max_new), max_new=max_new)
        self.sched.add(req)
        self.reqs.append(req)
        return req

    @property
    def busy(self) -> set[Request]:
        """Requests with tokens in a step in flight."""
        return {r for r in self.reqs if r.in_flight}

    def plan(self) -> SchedulerOutput:
        """Plan one step, check it, and put it in flight when it has work."""
        live = len(self.sched.running) + len(self.sched.waiting)
        busy, scheduled = self.busy, {r: r.num_scheduled for r in self.reqs}
        out = self.sched.schedule(self.depth)
        cfg = self.sched.cfg
        reqs = [i.req for i in out.items]
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert len(set(reqs)) == len(reqs)
        # Only a prefill's next piece joins a request already in flight (its earlier pieces sample nothing).
        assert all(scheduled[r] < len(r.tokens) for r in busy & set(reqs))
        assert len(reqs) <= -(-live // self.depth)  # a 1/depth share of the live requests
        assert len(self.sched.running) <= cfg.max_num_seqs
        assert not set(out.preempted) & busy  # a request in flight is never preempted
        for i in out.items:
            assert i.req.status is Status.RUNNING and i.req in self.sched.running
            assert i.num_new >= 1 and i.start == (scheduled[i.req] if i.req in busy else i.req.num_computed)
            assert i.start + i.num_new == i.req.num_scheduled <= len(i.req.tokens)
            assert len(i.req.block_table) * self.blocks.block_size >= i.start + i.num_new
        if out.items:
            self.inflight.append((out, [tuple(i.req.block_table) for i in out.items]))
        return out

    def run(self, item, table: tuple[int, ...]) -> None:
        """The fake model: read every earlier slot, write the granted ones (an aborted request writes too)."""
        req, bs = item.req, self.blocks.block_size
        live = req.status is not Status.FINISHED
        if live:
            for p in range(item.start):
                assert self.kv.get((table[p // bs], p % bs)) == tuple(req.tokens[:p + 1]), f"{req.id}: bad KV at {p}"
        for p in range(item.start, item.start + item.num_new):
            if live:
                assert self.blocks.ref[table[p // bs]] == 1, f"{req.id} writes into a shared block"
            self.kv[table[p // bs], p % bs] = tuple(req.tokens[:p + 1])

    def collect(self) -> None:
        """Finish the oldest step in flight as LLMEngine._finish_oldest does."""
        out, tables = self.inflight.popleft()
        for item, table in zip(out.items, tables):
            self.run(item, table)
            if item.req.status is Status.FINISHED:  # aborted or timed out while in flight
                continue
            self.sched.computed(item)
            if item.samples:
                item.req.tokens.append(next_token(item.req.tokens))
                if item.req.num_generated >= item.req.max_new:
                    self.sched.finish(item.req, "length")

    def step(self) -> None:
        """Fill the pipeline, finish the oldest step, check the invariants."""
        while len(self.inflight) < self.depth and self.plan().items:
            pass
        if self.inflight:
            self.collect()
        self.check()

    def drain(self, max_steps: int = 5000) -> None:
        """Step until every request has finished."""
        for _ in range(max_steps):
            if not (self.sched.has_work() or self.inflight):
                return
            self.step()
        raise AssertionError(f"no progress: {len(self.sched.running)} running, {len(self.sched.waiting)} waiting")

    def check(self) -> None:
        """Ref counts equal the block tables holding each block; queues and statuses agree."""
        blocks, sched = self.blocks, self.sched
        holders = [0] * blocks.num_blocks
        for r in self.reqs:
            assert len(set(r.block_table)) == len(r.block_table)
            for b in r.block_table:
                holders[b] += 1
        assert blocks.ref == holders
        assert set(blocks.free) == {b for b, n in enumerate(holders) if n == 0}
        assert all(blocks.hash_of[b] == h for h, b in blocks.by_hash.items())
        assert not set(sched.waiting) & set(sched.running)
        for r in self.reqs:
            assert r.out.num_cached_tokens <= len(r.prompt) - 1  # prompt tokens, the last one always computed
            if r.status is Status.FINISHED:
                assert not r.block_table and r not in sched.running and r not in sched.waiting
            elif r.status is Status.WAITING:
                assert r in sched.waiting and not r.block_table and r.num_computed == 0
            else:
                assert r in sched.running and r.num_hashed_blocks * blocks.block_size <= r.num_computed


def test_config_refuses_empty_caps():
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ConfigError, match="max_waiting 0 would refuse them all"):
        SchedulerConfig(max_waiting=0)


def test_admission_is_fifo_up_to_max_num_seqs():
    d = Driver(max_num_seqs=2)
    reqs = [d.add([1, 2, 3], max_new=2) for _ in range(4)]
    d.step()
    assert d.sched.running == reqs[:2] and list(d.sched.waiting) == reqs[2:]
    d.drain()
    assert [r.out.finish_reason for r in reqs] == ["length"] * 4
    assert [r.tokens for r in reqs] == [alone([1, 2, 3], 2)] * 4


def test_add_refuses_a_full_queue_until_it_drains():
    d = Driver(max_waiting=2, max_num_seqs=1)
    d.add([1])
    d.add([2])
    with pytest.raises(QueueFull):
        d.add([3])
    d.step()  # one admitted: a seat in the queue frees up
    d.add([3])
    d.drain()


def test_add_refuses_a_request_larger_than_the_pool():
    d = Driver(num_blocks=4, block_size=4)
    with pytest.raises(RequestError, match="whole pool holds 16"):
        d.add([1] * 10, max_new=7)
    assert not d.sched.has_work()
    req = d.add([1] * 10, max_new=6)  # exactly the pool
    d.drain()
    assert req.tokens == alone([1] * 10, 6)


class StubExecutor:
    """Just enough of an Executor for LLMEngine to size its pool: no ranks, no weights."""

    depth, world_size, broken, cp = 1, 1, False, 1

    def call_all(self, method: str, *args):
        """kv_block_bytes: 1 MiB a block."""
        return [2**20]

    def call(self, method: str, *args) -> None:
        """allocate_kv: nothing to allocate."""


def test_engine_admission_applies_the_context_window_and_the_vocabulary():
    from types import SimpleNamespace

    from meshlm.engine.engine import EngineConfig, LLMEngine

    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50,
                               "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                               "num_attention_heads": 1})
    engine = LLMEngine(StubExecutor(), cfg, SimpleNamespace(eos_id=None), max_context=32,
                       engine_cfg=EngineConfig(block_size=4, kv_cache_mb=1000,
                                               scheduler=SchedulerConfig(max_num_seqs=3)))
    assert engine.blocks.num_blocks == 3 * 8  # no more than max_num_seqs full contexts
    with pytest.raises(RequestError, match="context window is 32"):
        engine.add_request([1] * 32, SamplingParams())
    assert engine.add_request([1] * 30, SamplingParams(max_tokens=64)).max_new == 2  # clipped to the window
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match=r"token id 50 is outside the vocabulary \[0, 50\)"):
        engine.add_request([1, 50], SamplingParams())
    engine.add_request([1], SamplingParams(), request_id="x")
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([1], SamplingParams(), request_id="x")
    assert engine.abort("x") and not engine.abort("x") and not engine.abort("unknown")
    assert len(engine.scheduler.waiting) == 1


def test_budget_chunks_a_long_prompt_and_samples_after_the_last_chunk():
    d = Driver(max_num_batched_tokens=5)
    req = d.add(list(range(12)), max_new=2)
    grants = []
    while d.sched.has_work():
        out = d.plan()
        grants += [(i.start, i.num_new, i.samples) for i in out.items]
        d.collect()
    assert grants == [(0, 5, False), (5, 5, False), (10, 2, True), (12, 1, True)]
    assert req.tokens == alone(list(range(12)), 2)


def test_running_requests_keep_their_grant_before_waiting_ones_are_admitted():
    d = Driver(max_num_batched_tokens=8)
    a = d.add([1] * 4)
    b = d.add([2] * 20)
    first = d.plan()
    assert [(i.req, i.start, i.num_new) for i in first.items] == [(a, 0, 4), (b, 0, 4)]  # the rest of the budget
    d.collect()
    second = d.plan()  # a decodes; b's next chunk takes what is left, in admission order
    assert [(i.req, i.start, i.num_new) for i in second.items] == [(a, 4, 1), (b, 4, 7)]
    d.collect()
    c = d.add([3] * 3)
    third = d.plan()
    assert [i.req for i in third.items] == [a, b] and c in d.sched.waiting  # budget spent before c's turn
    d.collect()
    d.drain()


def test_preemption_takes_the_most_recently_admitted_and_recomputes_it():
    d = Driver(num_blocks=6, block_size=2)
    prompts = [1, 2, 3, 4], [2, 3, 4, 1], [3, 4, 1, 2]
    a, b, c = (d.add(p, max_new=5) for p in prompts)
    d.step()  # all three admitted: 2 full blocks each, the pool is full
    assert d.blocks.num_free == 0
    out = d.plan()  # a needs a third block: c, the last admitted, is preempted
    assert out.preempted == [c] and d.sched.waiting[0] is c
    assert c.num_computed == 0 and not c.block_table and c.out.num_preemptions == 1
    assert [i.req for i in out.items] == [a, b]  # no admission in a step that preempted
    d.collect()
    d.drain()
    assert d.sched.num_preemptions == sum(r.out.num_preemptions for r in (a, b, c)) >= 1
    assert [r.tokens for r in (a, b, c)] == [alone(p, 5) for p in prompts]
    assert d.blocks.num_free == 6


def test_a_later_request_preempts_itself_rather_than_an_earlier_one():
    d = Driver(num_blocks=4, block_size=2)
    a, b = d.add([1, 2, 3], max_new=4), d.add([4, 1, 2, 3], max_new=4)
    d.step()  # both prefilled, 2 blocks each
    out = d.plan()  # a's next token fits its blocks; b's needs a third block and none is free
    assert out.preempted == [b] and [i.req for i in out.items] == [a]
    d.collect()
    d.drain()
    assert a.tokens == alone([1, 2, 3], 4) and b.tokens == alone([4, 1, 2, 3], 4)
    assert b.out.num_preemptions == 1 and b.out.num_cached_tokens == 0  # its own blocks found again: no prompt hit


def test_prefix_hit_reuses_full_blocks_and_keeps_the_last_token_computed():
    d = Driver(block_size=4)
    prompt = [1, 2, 3, 4, 2, 3, 4, 1]  # exactly two full blocks
    first = d.add(prompt + [4, 4], max_new=1)
    d.drain()
    held = d.add(prompt + [4, 4], max_new=3)  # same prompt: both blocks hit, the 2 tokens after are computed
    out = d.plan()
    assert (out.items[0].start, held.out.num_cached_tokens) == (8, 8)
    d.collect()
    exact = d.add(prompt, max_new=2)  # the whole prompt cached: its last block is recomputed to sample
    out = d.plan()
    item = next(i for i in out.items if i.req is exact)
    assert (item.start, item.num_new) == (4, 4) and exact.out.num_cached_tokens == 4
    assert exact.block_table[0] == held.block_table[0] and d.blocks.ref[exact.block_table[0]] == 2
    d.collect()
    d.drain()
    assert held.tokens == alone(prompt + [4, 4], 3) and exact.tokens == alone(prompt, 2)
    assert first.tokens == alone(prompt + [4, 4], 1)


def test_prefix_hits_follow_the_hash_chain_not_a_block_alone():
    d = Driver(block_size=2, max_num_batched_tokens=2)  # one block per step: blocks are published one by one
    d.add([1, 2, 3, 4, 0], max_new=1)
    d.drain()
    moved = d.add([3, 4, 0], max_new=1)  # (3, 4) is cached, but after (1, 2): its K/V is not this prompt's
    same = d.add([1, 2, 3, 4, 1], max_new=1)
    d.drain()
    assert (moved.out.num_cached_tokens, same.out.num_cached_tokens) == (0, 4)


def test_abort_frees_blocks_and_removes_the_request_from_its_queue():
    d = Driver(max_num_seqs=1)
    running, waiting = d.add([1] * 9, max_new=8), d.add([2] * 5)
    d.step()
    assert running.block_table and waiting in d.sched.waiting
    d.sched.finish(running, "abort")
    d.sched.finish(waiting, "abort")
    d.sched.finish(waiting, "stop")  # a second finish changes nothing
    assert (running.out.finish_reason, waiting.out.finish_reason) == ("abort", "abort")
    assert not d.sched.has_work() and d.blocks.num_free == d.blocks.num_blocks
    d.check()


def test_abort_while_in_flight_frees_blocks_and_its_step_is_dropped():
    d = Driver(depth=2)
    a, b = d.add([1] * 6), d.add([2] * 6)
    assert [i.req for i in d.plan().items] == [a]  # 2 live requests, depth 2: one each
    assert [i.req for i in d.plan().items] == [b]
    d.sched.finish(a, "abort")  # a is in flight
    d.check()
    d.collect()
    assert a.num_computed == 0 and len(a.tokens) == 6  # its step came back and was dropped
    d.drain()
    assert b.tokens == alone([2] * 6, 4)


def test_deadline_times_out_waiting_running_and_in_flight_requests():
    d = Driver(max_num_seqs=1, depth=2)
    a, b, c = d.add([1] * 3), d.add([2] * 3), d.add([3] * 3)
    d.plan()  # a in flight
    past = time.perf_counter() - 1
    a.deadline = b.deadline = past
    out = d.plan()
    assert set(out.timed_out) == {a, b} and [i.req for i in out.items] == [c]
    assert a.out.finish_reason == b.out.finish_reason == "timeout" and not a.block_table
    d.drain()
    assert c.tokens == alone([3] * 3, 4)


def test_pipeline_depth_splits_the_live_requests_into_disjoint_groups():
    d = Driver(num_blocks=32, depth=3)
    reqs = [d.add([i % VOCAB] * 3, max_new=3) for i in range(7)]
    groups = [[i.req for i in d.plan().items] for _ in range(3)]
    assert groups == [reqs[0:3], reqs[3:6], reqs[6:7]]  # ceil(7/3) = 3 seats a step
    assert not d.plan().items  # every live request is in flight
    d.drain()
    assert all(r.tokens == alone(r.prompt, 3) for r in reqs)


def test_prompt_chunks_flow_back_to_back_and_only_the_last_samples():
    """With a chunk plan, chunk k + 1 of a prompt is granted while chunk k is in flight; only the last one
    samples; a request whose every token is in flight gets nothing; the result equals the request alone."""
    d = Driver(depth=3, chunk=4)
    a = d.add(list(range(10)), max_new=3)
    pieces = [d.plan().items for _ in range(3)]
    assert [(i.start, i.num_new, i.samples) for p in pieces for i in p] == [(0, 4, False), (4, 4, False),
                                                                           (8, 2, True)]
    assert a.in_flight and a.num_computed == 0 and a.num_scheduled == 10
    assert not d.plan().items  # every known token is in flight: nothing to grant
    d.drain()
    assert a.tokens == alone(list(range(10)), 3)


def test_a_request_in_flight_is_never_preempted():
    d = Driver(num_blocks=4, block_size=2, depth=2)
    a, b = d.add([1, 2, 3, 4], max_new=4), d.add([2, 3, 4, 1], max_new=4)
    d.plan(), d.plan()  # each holds 2 blocks; both in flight
    d.collect()  # a sampled: it needs a third block, b is in flight
    out = d.plan()
    assert out.preempted == [a] and not out.items  # a preempts itself, never b
    d.drain()
    assert a.tokens == alone([1, 2, 3, 4], 4) and b.tokens == alone([2, 3, 4, 1], 4)


OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 2), min_size=1, max_size=10), st.integers(1, 5)),
    st.tuples(st.just("add"), st.lists(st.integers(0, 2), min_size=1, max_size=10), st.integers(1, 5)),
    st.tuples(st.just("step")), st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("timeout"), st.integers(0, 30)),
), min_size=4, max_size=40)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(2, 10), block_size=st.integers(1, 4), depth=st.integers(1, 3),
       chunk=st.sampled_from([None, 1, 3]), max_num_seqs=st.integers(1, 4), budget=st.integers(1, 12),
       max_waiting=st.integers(1, 6), ops=OPS)
def test_random_operations_keep_the_invariants_and_finish_every_request(num_blocks, block_size, depth, chunk,
                                                                        max_num_seqs, budget, max_waiting, ops):
    """Whatever arrives, steps, aborts or times out, with prompts cut into chunks or not: ref counts match the
    block tables, budgets and seats hold, every KV read is right, and every request that was not cut short
    ends with its solo tokens."""
    d = Driver(num_blocks, block_size, depth, chunk, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
               max_waiting=max_waiting)
    cut: set[Request] = set()
    for op in ops:
        if op[0] == "add":
            _, prompt, max_new = op
            too_big = d.blocks.blocks_for(len(prompt) + max_new) > num_blocks
            full = len(d.sched.waiting) >= max_waiting
            try:
                d.add(prompt, max_new)
                assert not too_big and not full
            except RequestError:
                assert too_big
            except QueueFull:
                assert full and not too_big
        elif op[0] == "step":
            d.step()
        elif d.reqs:
            req = d.reqs[op[1] % len(d.reqs)]
            if req.status is not Status.FINISHED:
                cut.add(req)
                if op[0] == "abort":
                    d.sched.finish(req, "abort")
                else:
                    req.deadline = time.perf_counter() - 1
            d.check()
    d.drain()
    assert d.blocks.num_free == num_blocks and not d.busy
    for r in d.reqs:
        assert r.status is Status.FINISHED
        if r not in cut:
            assert r.out.finish_reason == "length" and r.tokens == alone(r.prompt, r.max_new)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(2, 6), block_size=st.integers(1, 3), depth=st.integers(1, 3),
       max_num_seqs=st.integers(1, 8), budget=st.integers(1, 16),
       burst=st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=8), st.integers(1, 8)),
                      min_size=1, max_size=8))
def test_a_burst_on_a_tight_pool_preempts_and_every_request_still_ends_as_alone(num_blocks, block_size, depth,
                                                                                max_num_seqs, budget, burst):
    """Requests that together need far more blocks than the pool: preemption and recomputation keep the
    invariants, and each request ends with the tokens it gets alone."""
    d = Driver(num_blocks, block_size, depth, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    reqs = [d.add(p, n) for p, n in burst if d.blocks.blocks_for(len(p) + n) <= num_blocks]
    d.drain()
    assert [r.tokens for r in reqs] == [alone(r.prompt, r.max_new) for r in reqs]
    assert d.sched.num_preemptions == sum(r.out.num_preemptions for r in reqs)
    assert d.blocks.num_free == num_blocks
