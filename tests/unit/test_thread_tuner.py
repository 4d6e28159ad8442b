"""The serving replica's per-bucket choice of decode threads (serve/thread_tuner.py), on synthetic step times,
and a replica's greedy tokens unchanged by it."""

from __future__ import annotations

import pytest
import torch

from meshlm.serve import thread_tuner
from meshlm.serve.thread_tuner import EXPLORE_EVERY, MIN_SAMPLES, ThreadTuner, bucket


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def run(tuner: ThreadTuner, steps: int, tokens: int, cost: dict[int, float]) -> list[int]:
    """`steps` decode steps of `tokens` tokens, each taking cost[threads] seconds; the thread counts used."""
    used = []
    for _ in range(steps):
        n = tuner.before_step(tokens)
        assert torch.get_num_threads() == n
        used.append(n)
        tuner.after_step(tokens, cost[n])
    return used


def test_bucket_is_the_next_power_of_two():
    assert [bucket(t) for t in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


@pytest.mark.parametrize("faster", [1, 2])
def test_each_count_is_tried_then_the_faster_kept_with_rare_exploration(faster):
    tuner = ThreadTuner(2)
    cost = {faster: 0.005, 3 - faster: 0.008}
    used = run(tuner, 2 * MIN_SAMPLES, 1, cost)
    assert sorted(used) == [1] * MIN_SAMPLES + [2] * MIN_SAMPLES  # in turn while learning
    used = run(tuner, 4 * EXPLORE_EVERY, 1, cost)
    assert used.count(3 - faster) == 4  # one step in EXPLORE_EVERY on the other count
    assert used.count(faster) == 4 * EXPLORE_EVERY - 4
    assert tuner.median(1, faster) == pytest.approx(0.005)


def test_buckets_choose_apart_and_follow_a_change():
    tuner = ThreadTuner(2)
    run(tuner, 2 * MIN_SAMPLES, 1, {1: 0.005, 2: 0.008})  # one row: one thread is faster (a busy server)
    run(tuner, 2 * MIN_SAMPLES, 16, {1: 0.030, 2: 0.018})  # 16 rows: two threads
    assert tuner.before_step(1) == 1 and tuner.before_step(16) == 2
    tuner.planned = None
    # the load changes: two threads now faster at one row too; exploration finds it within the window
    used = run(tuner, thread_tuner.WINDOW * EXPLORE_EVERY, 1, {1: 0.008, 2: 0.005})
    assert used[-EXPLORE_EVERY:].count(2) >= EXPLORE_EVERY - 1


def test_other_steps_run_on_all_threads_and_are_not_counted():
    tuner = ThreadTuner(2)
    run(tuner, 2 * MIN_SAMPLES, 1, {1: 0.005, 2: 0.008})
    assert tuner.before_step(1) == 1
    tuner.after_step(None, 1.0)  # a prefill landed instead: not a sample
    tuner.after_step(5, 1.0)  # or a step of another bucket
    assert tuner.median(1, 1) == pytest.approx(0.005)
    assert tuner.before_step(None) == 2  # after a prefill or mixed step: all threads


def test_one_thread_is_left_alone():
    tuner = ThreadTuner(1)
    assert run(tuner, 20, 1, {1: 0.01}) == [1] * 20
    assert not tuner.times


def test_a_tuned_replica_gives_the_same_tokens(checkpoint):
    """A served replica whose steps switch between 2 and 1 threads produces the tokens of one that keeps 2."""
    import asyncio

    from meshlm import LLM, SamplingParams
    from meshlm.serve.engine_loop import EngineLoop

    async def tokens(loop_: EngineLoop, prompts: list[list[int]]) -> list[list[int]]:
        out: asyncio.Queue = asyncio.Queue()
        ids = [f"r{i}" for i in range(len(prompts))]
        await loop_.submit(ids, prompts, [SamplingParams(max_tokens=24, ignore_eos=True)] * len(prompts), out, None)
        got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        done = 0
        while done < len(prompts):
            u = await out.get()
            got[u.choice] += list(u.token_ids)
            done += u.finish_reason is not None
        return [got[i] for i in range(len(prompts))]

    prompts = [[1, 5, 9, 12], [1, 7, 3]]
    with LLM(str(checkpoint("llama_gqa")), dtype="float32", threads=2, progress=False) as llm:
        results = []
        for tune in (False, True):
            loop_ = EngineLoop(llm.engine, tune_threads=tune).start()
            try:
                results.append([asyncio.run(tokens(loop_, [p])) for p in prompts])
                if tune:
                    assert loop_.tuner is not None and loop_.tuner.times  # it counted decode steps
                    assert {n for (_, n) in loop_.tuner.times} == {1, 2}  # on both counts
            finally:
                loop_.stop()
    assert results[0] == results[1]
