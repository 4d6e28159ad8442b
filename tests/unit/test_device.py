"""Device and backend choice: CUDA when present, CPU otherwise, and clear errors for what cannot work."""

from __future__ import annotations

import pytest
import torch

from meshlm.cli import main
from meshlm.errors import ConfigError
from meshlm.parallel.device import DeviceChoice, rank_device, resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.delenv("MESHLM_DEVICE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.delenv("MESHLM_DEVICE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_without_cuda_ranks_run_on_the_cpu(no_cuda):
    """auto and cpu give CPU ranks over gloo; rank r maps to the CPU whatever r is."""
    assert resolve_device() == resolve_device("cpu", "gloo", 4) == DeviceChoice("cpu", "gloo")
    assert resolve_device().pg_backend == "gloo"
    assert rank_device("cpu", 3) == torch.device("cpu")


def test_cuda_or_nccl_without_a_gpu_is_refused(no_cuda):
    """--device cuda and --backend nccl without CUDA fail before any process starts, naming the fix."""
    with pytest.raises(ConfigError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--backend nccl needs CUDA.*--backend gloo"):
        resolve_device(None, "nccl")
    with pytest.raises(ConfigError, match="--backend nccl needs CUDA"):
        resolve_device("cpu", "nccl")
    with pytest.raises(ConfigError, match="unknown"):
        resolve_device("tpu")


def test_with_gpus_auto_takes_cuda_over_nccl(two_gpus, monkeypatch):
    """auto picks CUDA (tensors on NCCL, objects on gloo); more ranks than GPUs on a host is refused."""
    choice = resolve_device()
    assert choice == DeviceChoice("cuda", "nccl")
    assert choice.pg_backend == "cpu:gloo,cuda:nccl"
    assert resolve_device("cuda", "nccl", 2) == choice
    assert resolve_device("cpu") == DeviceChoice("cpu", "gloo")
    assert resolve_device("auto", "gloo") == DeviceChoice("cpu", "gloo")  # gloo asked for: CPU ranks
    with pytest.raises(ConfigError, match="3 ranks on this host need 3 GPUs"):
        resolve_device("cuda", world_size=3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 ranks per host of a world of 4
    assert resolve_device("cuda", world_size=4) == choice
    with pytest.raises(ConfigError, match="--backend gloo cannot carry CUDA tensors"):
        resolve_device("cuda", "gloo")


def test_cli_refuses_nccl_on_cpu_before_loading(no_cuda, capsys):
    """`meshlm generate --backend nccl` on a CPU-only host is a one-paragraph error, not a traceback."""
    assert main(["generate", "hi", "--backend", "nccl"]) == 2
    err = capsys.readouterr().err
    assert "meshlm: error: --backend nccl needs CUDA" in err and "Traceback" not in err


def test_llm_refuses_cuda_before_opening_the_model(no_cuda, tmp_path):
    """LLM(device="cuda") without a GPU fails at once, before the checkpoint is even opened."""
    from meshlm import LLM

    with pytest.raises(ConfigError, match="--device cuda"):
        LLM(str(tmp_path / "missing"), device="cuda", progress=False)
