"""Threads per decode step, chosen from measured step times: a server's own work needs a core too.

A replica's engine thread runs each step on `threads` intra-op threads (OpenMP, one parallel region per
step with a barrier between dependent phases). When those threads are all of the host's cores, the
server's work per token (the replica's event loop, the pipe to the router, the router's SSE writes, often
the load generator) preempts one of them mid-step and every barrier of the step waits for it: on the 2-core
dev host one stream of `meshlm serve --threads 2` (bundled Q4_1) ran at 8-12 ms per token where `--threads
1` ran at 7 ms and the offline step at 5 ms (docs/benchmarks.md, "Serving against llama-server").

So the replica times its decode steps (every grant one known token, no prompt chunk) per size bucket (the
step's tokens rounded up to a power of two) on `threads` and on `threads - 1`, and runs each bucket on the
faster: first each count MIN_SAMPLES times in turn, then the faster by the median of its last WINDOW steps,
with one step on the other every EXPLORE_EVERY steps of the bucket so that a change in load is followed.
A step's size is not known before it is scheduled: the last step's bucket stands for the next one (decode
steps keep their size until a request joins or ends), and a step that landed in another bucket is not
counted. Every other step (prefill, mixed) runs on `threads`. Off with one thread, and where the engine
spans processes (other ranks keep their own threads).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

import torch

MIN_SAMPLES = 4  # steps of each thread count per bucket before choosing
WINDOW = 16  # recent steps per (bucket, thread count) whose median decides
EXPLORE_EVERY = 32  # steps of a bucket between two steps on the thread count not chosen

log = logging.getLogger(__name__)


def bucket(tokens: int) -> int:
    """The power of two >= tokens (>= 1)."""
    return 1 << max(0, tokens - 1).bit_length()


class ThreadTuner:
    """Picks each decode step's intra-op thread count: `threads` or `threads - 1`, per size bucket."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.arms = (threads, threads - 1) if threads > 1 else (threads,)
        self.times: dict[tuple[int, int], deque] = {}  # (bucket, threads) -> recent step seconds
        self.count: dict[int, int] = {}  # bucket -> decode steps counted
        self.best: dict[int, int] = {}  # bucket -> the thread count it runs on (for the log)
        self.current = torch.get_num_threads()  # the count set now
        self.planned: tuple[int, int] | None = None  # (bucket, threads) the coming step was planned for

    def before_step(self, last_decode_tokens: int | None) -> int:
        """Set the thread count for the coming step from the last step's size (None: not a decode step)."""
        want = self.threads
        self.planned = None
        if len(self.arms) > 1 and last_decode_tokens:
            b = bucket(last_decode_tokens)
            want = self._choose(b)
            self.planned = (b, want)
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want
        return want

    def after_step(self, decode_tokens: int | None, seconds: float) -> None:
        """Count a finished step: its size when it was a decode step (else None) and its wall seconds."""
        if self.planned is None or not decode_tokens or bucket(decode_tokens) != self.planned[0]:
            return
        b, n = self.planned
        self.times.setdefault((b, n), deque(maxlen=WINDOW)).append(seconds)
        self.count[b] = self.count.get(b, 0) + 1

    def median(self, b: int, n: int) -> float | None:
        """Median seconds of the recent decode steps of bucket b on n threads (None: none yet)."""
        t = self.times.get((b, n))
        return statistics.median(t) if t else None

    def _choose(self, b: int) -> int:
        seen = [len(self.times.get((b, n), ())) for n in self.arms]
        if min(seen) < MIN_SAMPLES:  # in turn until each has its samples
            return self.arms[seen.index(min(seen))]
        fast = min(self.arms, key=lambda n: self.median(b, n))
        if self.best.get(b) != fast:
            log.info("decode steps of up to %d tokens now run on %d thread(s): %s", b, fast,
                     ", ".join(f"{n} thread(s) {self.median(b, n) * 1e3:.2f} ms" for n in self.arms))
            self.best[b] = fast
        if self.count.get(b, 0) % EXPLORE_EVERY == EXPLORE_EVERY - 1:  # now and then, the other one
            return next(n for n in self.arms if n != fast)
        return fast
