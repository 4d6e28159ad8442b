"""The Python API's lifecycle at tp=2: close, `with`, garbage collection and exit end the ranks; a clash is
refused with a clear error; a second LLM after the first works."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from meshlm import LLM, SamplingParams
from meshlm.errors import ConfigError
from meshlm.parallel import shm

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 9, 23, 7], [100, 3, 41]]


def _ranks() -> list[mp.Process]:
    return [p for p in mp.active_children() if p.name.startswith("meshlm-rank")]


def _shm_mapped() -> list[str]:
    """Shared-memory segments of meshlm still mapped in this process."""
    with open("/proc/self/maps") as f:
        return [line for line in f if os.path.join(shm.SHM_DIR, shm.PREFIX) in line]


def _all_released(pids: list[int]) -> None:
    """No rank process left, no default process group, no segment mapped."""
    assert pids, "the LLM should have started rank processes"
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "a rank process survived"
    assert not _ranks()
    assert not dist.is_initialized()
    assert not _shm_mapped()


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def alone(llm):
    """Greedy tokens of PROMPTS at tp=1 on each checkpoint used here (the reference for tp=2)."""
    return {kind: [o.token_ids for o in llm(kind).generate(PROMPTS, GREEDY)]
            for kind in ("llama_gqa", "llama_odd_heads")}


def test_del_then_create_again(checkpoint, alone):
    """create, use, `del`, create again (another model) at tp=2 in one process: the first LLM's ranks,
    process group and shared memory are gone after `del`, and the second LLM matches tp=1."""
    first = LLM(str(checkpoint("llama_gqa")), tp=2, progress=False)
    assert [o.token_ids for o in first.generate(PROMPTS, GREEDY)] == alone["llama_gqa"]
    pids = [p.pid for p in _ranks()]
    del first
    _all_released(pids)
    second = LLM(str(checkpoint("llama_odd_heads")), tp=2, progress=False)
    assert [o.token_ids for o in second.generate(PROMPTS, GREEDY)] == alone["llama_odd_heads"]
    pids = [p.pid for p in _ranks()]
    second.close()
    second.close()  # idempotent
    _all_released(pids)


def test_context_manager_and_clash(checkpoint, alone):
    """Inside `with`, a second tp=2 LLM is refused with an error naming close(), and the first keeps working;
    leaving the block ends the ranks, and the closed LLM says so when used."""
    with LLM(str(checkpoint("llama_gqa")), tp=2, progress=False) as first:
        pids = [p.pid for p in _ranks()]
        with pytest.raises(ConfigError, match=r"close\(\)"):
            LLM(str(checkpoint("llama_odd_heads")), tp=2, progress=False)
        assert [p.pid for p in _ranks()] == pids  # the refused LLM started no rank
        assert [o.token_ids for o in first.generate(PROMPTS, GREEDY)] == alone["llama_gqa"]
    assert first.closed
    _all_released(pids)
    with pytest.raises(ConfigError, match="closed"):
        first.generate(PROMPTS, GREEDY)


def test_reference_cycle_is_collected_before_a_clash(checkpoint):
    """An unreachable LLM kept alive only by a reference cycle does not block the next one."""
    first = LLM(str(checkpoint("llama_gqa")), tp=2, progress=False)
    pids = [p.pid for p in _ranks()]
    first.me = first  # a cycle: `del` alone leaves it to the garbage collector
    gc.disable()
    try:
        del first
        second = LLM(str(checkpoint("llama_gqa")), tp=2, progress=False)  # collects the cycle first
    finally:
        gc.enable()
    assert not [p for p in pids if _alive(p)]
    second.close()


def test_interpreter_exit_ends_the_ranks(checkpoint):
    """A script that never closes its tp=2 LLM exits cleanly: at exit the finalizer stops the rank (exit code
    0, not killed), the process group is gone by the last exit handler, and no rank process is left."""
    script = (
        "import atexit\n"
        "ranks = []\n"
        "def report():\n"  # registered first, so it runs after the LLM's finalizer
        "    import torch.distributed as dist\n"
        "    print('group', dist.is_initialized(), 'exitcodes', [p.exitcode for p in ranks.copy()], flush=True)\n"
        "    print('pids', *[p.pid for p in ranks], flush=True)\n"
        "atexit.register(report)\n"
        "import meshlm\n"
        f"llm = meshlm.LLM({str(checkpoint('llama_gqa'))!r}, tp=2, progress=False)\n"
        "llm.generate([[5, 9, 23]], meshlm.SamplingParams(max_tokens=4, ignore_eos=True))\n"
        "ranks.extend(llm.executor.local.procs.values())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "group False exitcodes [0]" in run.stdout, run.stdout + run.stderr
    pids = [int(p) for p in run.stdout.split("pids")[1].split()]
    assert pids and not [p for p in pids if _alive(p)]
