"""Robust line fits for calibration points that carry outliers: the in-engine wait per collective.

A collective inside a step waits for the slower peer. The peers run the same compute, so their skew, and
with it the wait, grows with the compute before the call: wait = w0 + c x segment with w0, c >= 0 (w0:
the call's own dispatch and wake-up; c: the fraction by which one rank's segment outruns the other's).
Single probe points are noisy (a peer descheduled for a millisecond doubles one point), so the line is
the Theil-Sen fit: c = the median of the slopes between every pair of points, w0 = the median of
w - c x s; both clamped at 0. One bad point of n >= 3 moves neither median by more than its neighbours.
The same line reads the compute a transport adds between two calls (Link.slows: roofline segment, extra
compute per call), measured by the same probe samples.
"""

from __future__ import annotations

import statistics
from functools import lru_cache


@lru_cache(maxsize=256)
def wait_line(points: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """(w0 seconds, c seconds per second of segment) fitted to (segment, wait) points; (0, 0) for none."""
    if not points:
        return 0.0, 0.0
    if len(points) == 1:
        return max(0.0, points[0][1]), 0.0
    slopes = [(w1 - w0) / (s1 - s0) for i, (s0, w0) in enumerate(points) for s1, w1 in points[i + 1:]
              if abs(s1 - s0) > 1e-12]
    c = max(0.0, statistics.median(slopes)) if slopes else 0.0
    w0 = max(0.0, statistics.median(w - c * s for s, w in points))
    return w0, c


def wait_text(points: tuple[tuple[float, float], ...]) -> str:
    """The fitted line in words, for profile summaries ('' without points)."""
    if not points:
        return ""
    w0, c = wait_line(points)
    return f", in-engine wait {w0 * 1e6:.0f} us + {c:.3f} x the compute before a call ({len(points)} points)"


def slow_text(points: tuple[tuple[float, float], ...]) -> str:
    """A transport's extra compute per collective call (Link.slows) in words ('' without points)."""
    if not points:
        return ""
    s0, k = wait_line(points)
    return f", compute between calls + {s0 * 1e6:.0f} us + {k:.3f} x its roofline"
