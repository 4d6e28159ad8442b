"""Multi-node launch: two torchrun "nodes" on 127.0.0.1 meet through the c10d rendezvous."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshlm.parallel.launch import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_two_torchrun_nodes_match_one_process(checkpoint):
    """tp=2 across two single-process torchrun nodes prints the same greedy text as one process."""
    model = str(checkpoint("llama_gqa"))
    args = ["generate", "w5. w6. w7.", "--model", model, "--max-tokens", "16", "--ignore-eos"]
    single = subprocess.run([sys.executable, "-m", "meshlm.cli", *args], capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0, single.stderr
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch and should sit beside the interpreter"
    port = free_port()
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"meshlm-test-{port}",
                               "--max-restarts", "0", "-m", "meshlm.launch", *args, "--tp", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [n.communicate(timeout=180) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], [r[1][-2000:] for r in results]
    printed = [out for out, _ in results if out.strip()]
    assert len(printed) == 1, "exactly one node hosts rank 0 and prints"
    assert printed[0] == single.stdout
