"""Launch faults: a rank that dies mid-run or fails at start ends the launch fast, naming the rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def children(pid: int) -> list[int]:
    """Direct child pids of pid, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A random Llama with a long context, so generation runs long enough to be interrupted."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import _write_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("long")
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    _write_tokenizer(path, 512)
    return path


def meshlm_cmd(*args: str) -> list[str]:
    """The CLI as a subprocess command."""
    return [sys.executable, "-m", "meshlm.cli", *args]


def test_rank_killed_mid_generation(long_model):
    """kill -9 of rank 1 while generating: non-zero exit within seconds, the rank named, no orphans, /dev/shm clean."""
    proc = subprocess.Popen(meshlm_cmd("generate", "w5. w6. w7.", "--model", str(long_model), "--tp", "2",
                                       "--max-tokens", "15000", "--ignore-eos"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until tokens stream (rank 1 is up and generating)
            if proc.stdout.read(20):
                break
        kids = children(proc.pid)
        ranks = [k for k in kids
                 if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="ignore")]
        assert len(ranks) == 1, "expected exactly one spawned rank (rank 1) under the launcher"
        time.sleep(0.5)
        t0 = time.time()
        os.kill(ranks[0], signal.SIGKILL)
        code = proc.wait(timeout=30)
        elapsed = time.time() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0
    assert elapsed < 15, f"launcher took {elapsed:.1f}s to notice the dead rank"
    assert "rank 1" in err, err
    assert "Traceback" not in err, err
    time.sleep(0.5)
    assert not [k for k in kids if alive(k)], "a rank process outlived the launch"
    left = [str(p) for p in Path("/dev/shm").glob(f"meshlm-{proc.pid}-*")]  # rank 0 names its segments
    assert not left, f"shared-memory segments of the launch outlived it: {left}"


def test_rank_failing_at_start_fails_fast(tmp_path, long_model):
    """A rank that cannot load (its shard file vanished under it) fails the launch, naming the error."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in long_model.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").write_bytes(b"\x00" * 16)  # corrupt header: every rank fails to load
    t0 = time.time()
    res = subprocess.run(meshlm_cmd("generate", "w5.", "--model", str(bad), "--tp", "2"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert time.time() - t0 < 60
    assert "safetensors" in res.stderr.lower() or "truncated" in res.stderr.lower(), res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_bad_layouts_refused_before_start(long_model):
    """tp above the head count, or a world size that doesn't match, is refused with the fix named."""
    from meshlm.errors import ConfigError
    from meshlm.parallel.mesh import ParallelDims

    with pytest.raises(ConfigError, match="world size"):
        ParallelDims(tp=2, pp=2, world_size=3)
    res = subprocess.run(meshlm_cmd("generate", "w5.", "--model", str(long_model), "--tp", "8"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "tp=8 exceeds the model's 4 attention heads" in res.stderr
    assert "Traceback" not in res.stderr
