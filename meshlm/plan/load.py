"""Calibration on a shared host: how much CPU other processes took, and measurements repeated until they agree.

A profile taken while other work ran under it is slow by however much that work took, and every plan made
from it inherits the error. So calibrate() watches the other load over the whole run (other_load: /proc/stat
ticks less this process tree's own) and refuses to save above a limit, and each rate is measured in rounds
until two in a row agree (settle). Mirrors benchmarks/common.py's helpers (meshlm never imports benchmarks/).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from meshlm.errors import ConfigError


def stat_ticks() -> tuple[int, int]:
    """(all, idle + iowait) CPU ticks since boot, summed over CPUs."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v), v[3] + v[4]


def _tree_ticks(root: int) -> int:
    """User + system ticks used so far by process `root` and its live descendants."""
    parent, ticks = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parent[int(d.name)], ticks[int(d.name)] = int(rest[1]), int(rest[11]) + int(rest[12])
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, pp in parent.items() if pp == p and c not in tree]
    return sum(ticks.get(p, 0) for p in tree)


def _own_ticks() -> int:
    """Ticks of this process tree: the live processes plus children already reaped (os.times)."""
    t = os.times()
    return _tree_ticks(os.getpid()) + round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


@contextmanager
def other_load() -> Iterator[list[float]]:
    """Yields a one-item list; on exit it holds the share of all CPUs that processes outside this process
    tree used during the block (0.0 where /proc is unavailable)."""
    box = [0.0]
    try:
        (t0, i0), m0 = stat_ticks(), _own_ticks()
    except OSError:
        yield box
        return
    yield box
    (t1, i1), m1 = stat_ticks(), _own_ticks()
    box[0] = max(0.0, ((t1 - t0) - (i1 - i0) - (m1 - m0)) / max(1, t1 - t0))


def check_load(load: float, limit: float) -> None:
    """Raise when other processes used more than `limit` of the CPUs during a calibration."""
    if load > limit:
        raise ConfigError(f"calibration refused: other processes used {load:.0%} of the CPUs while it ran "
                          f"(limit {limit:.0%}), so its rates would be low by about that much. Run "
                          "`meshlm plan --calibrate` again when the machine is quiet, or pass --max-load "
                          f"{min(1.0, load + 0.05):.2f} to save a profile taken under this load anyway.")


def settle(measure: Callable[[], float], what: str, tol: float = 0.05, rounds: int = 6,
           higher: bool = True) -> float:
    """Repeat `measure` until two rounds in a row agree within `tol`; the better of that pair.

    `higher`: larger is better (a rate); else smaller (a time). Raises, naming the fix, when `rounds`
    rounds never settle (other work comes and goes under the measurement)."""
    best = max if higher else min
    last = measure()
    seen = [last]
    for _ in range(rounds - 1):
        x = measure()
        seen.append(x)
        if abs(x - last) <= tol * max(abs(x), abs(last), 1e-30):
            return best(x, last)
        last = x
    raise ConfigError(f"calibration refused: {what} did not settle in {rounds} rounds (no two in a row "
                      f"within {tol:.0%}: {', '.join(f'{x:.4g}' for x in seen)}); other work is coming and "
                      "going on this machine. Run `meshlm plan --calibrate` again when it is quiet, or pass "
                      "--tolerance 0.1 to accept rounds 10% apart.")
