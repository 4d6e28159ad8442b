"""The router's decisions as pure functions: where a request goes, when a replica has failed, when to retry.

No processes, no clocks read here (every `now` is passed in), so each rule is unit-tested on its own
(tests/unit/test_routing.py, with hypothesis).

- pick(): least outstanding tokens among the routable replicas, except that a prompt prefers the replica
  its leading block hashes to (rendezvous hashing, so it stays put while replicas come and go: that
  replica's prefix cache holds it) unless that replica carries more than `slack` tokens above the least.
- CircuitBreaker: closed (routable) -> open on a failure, for a cooldown that doubles with each failure
  inside `window_s` (a replica that fails again waits longer) -> half-open while restarted and probed ->
  closed when the probe passes.
- stalled(): the failure detector over heartbeats: no heartbeat for `stall_s`, or an engine call running
  without the engine's own progress (calls finished, rank 0's decoder layers run) moving for `stall_s`.
- retry_delay(): bounded attempts, jittered exponential backoff, never past the request's deadline.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica when it picks: routable or not, and its outstanding tokens."""

    id: int
    routable: bool  # healthy and its breaker closed
    outstanding: int  # prompt tokens not yet computed + tokens still to generate, over its requests


def affinity_key(prompt: Sequence[int], block_size: int) -> bytes:
    """The prefix-cache key of a prompt: its first full block (the whole prompt when shorter)."""
    head = prompt[:block_size]
    return b",".join(str(t).encode() for t in head)


def _score(key: bytes, replica: int) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"/" + str(replica).encode(), digest_size=8).digest(), "big")


def pick(replicas: Sequence[ReplicaView], key: bytes, slack: int) -> int | None:
    """The replica for a request with affinity `key`, or None when none is routable.

    Invariant: the chosen replica's outstanding tokens are at most the least routable one's plus `slack`.
    """
    ok = [r for r in replicas if r.routable]
    if not ok:
        return None
    least = min(ok, key=lambda r: (r.outstanding, r.id))
    home = max(ok, key=lambda r: _score(key, r.id))
    return home.id if home.outstanding <= least.outstanding + slack else least.id


class CircuitBreaker:
    """Per replica: closed while it serves, open after a failure for a cooldown, half-open while probed."""

    def __init__(self, base_s: float = 1.0, max_s: float = 60.0, window_s: float = 300.0) -> None:
        self.base_s, self.max_s, self.window_s = base_s, max_s, window_s
        self.state = HALF_OPEN  # a new replica is probed before it takes traffic
        self.failures: list[float] = []  # times of recent failures
        self.open_until = 0.0

    def fail(self, now: float) -> float:
        """Record a failure: open the circuit; the cooldown (seconds) before the next try."""
        self.failures = [t for t in self.failures if now - t < self.window_s] + [now]
        cooldown = min(self.max_s, self.base_s * 2 ** (len(self.failures) - 1))
        self.state, self.open_until = OPEN, now + cooldown
        return cooldown

    def may_try(self, now: float) -> bool:
        """True once an open circuit's cooldown is over (the replica may be restarted and probed)."""
        return self.state != OPEN or now >= self.open_until

    def trying(self) -> None:
        """A restart and probe begin."""
        self.state = HALF_OPEN

    def succeed(self) -> None:
        """The probe passed: traffic may flow."""
        self.state = CLOSED

    @property
    def closed(self) -> bool:
        """True while the replica may be sent requests."""
        return self.state == CLOSED


@dataclass(frozen=True)
class Beat:
    """A replica's heartbeat: the engine's own progress and how long its current call has gone without any."""

    progress: int  # engine calls finished + decoder layers rank 0 ran (both advanced by the engine itself)
    busy_s: float  # seconds the current engine call has gone without progress (0 when idle)


def stalled(beat: Beat | None, beat_age_s: float, stall_s: float) -> str | None:
    """Why a replica counts as failed by its heartbeats, or None: silent, or stuck in one engine call."""
    if beat_age_s > stall_s:
        return f"no heartbeat from the replica's rank 0 for {beat_age_s:.1f} s (stopped or hung)"
    if beat is not None and beat.busy_s > 0 and beat.busy_s + beat_age_s > stall_s:
        return (f"an engine step has made no progress for {beat.busy_s + beat_age_s:.1f} s "
                "(a rank is stopped or hung)")
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request may move to another replica, and the pause before each move."""

    max_attempts: int = 3  # replicas a request may be lost on before it fails
    base_s: float = 0.05
    max_s: float = 1.0


def retry_delay(policy: RetryPolicy, attempt: int, now: float, deadline: float | None,
                rng: random.Random) -> float | None:
    """Seconds to wait before attempt `attempt` (1 = the first move), or None when it must not be made.

    Full jitter in [delay / 2, delay] with delay = base * 2^(attempt - 1) capped at max_s; a draw that would
    end at or after the deadline is cut to delay / 2 (a move that can still be made in time is made); None
    past max_attempts or when even delay / 2 would end at or after the deadline.
    """
    if attempt > policy.max_attempts:
        return None
    full = min(policy.max_s, policy.base_s * 2 ** (attempt - 1))
    delay = full * rng.uniform(0.5, 1.0)
    if deadline is not None and now + delay >= deadline:
        delay = full / 2
        if now + delay >= deadline:
            return None
    return delay
