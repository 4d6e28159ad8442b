"""The calibration's worker processes: a dead worker fails the calibration at once, not after its timeout."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from meshlm.plan.calibrate import _results


def test_a_worker_that_dies_fails_fast():
    """A child that exits non-zero without reporting raises within seconds of a 300 s timeout."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=os._exit, args=(3,)), ctx.Process(target=time.sleep, args=(60,))]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exit 3"):
        _results(out, procs, 2, 300.0)
    assert time.monotonic() - t0 < 30
    for p in procs:
        p.join(timeout=10)
    assert not any(p.is_alive() for p in procs)  # the sleeping survivor was stopped too


def test_results_are_collected():
    """Results that the children put are returned, one per child."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    for x in (1.0, 2.0):
        out.put(x)
    procs = [ctx.Process(target=time.sleep, args=(0,))]
    procs[0].start()
    assert sorted(_results(out, procs, 2, 30.0)) == [1.0, 2.0]
    procs[0].join()
