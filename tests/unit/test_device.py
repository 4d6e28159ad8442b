"""Device and backend choice: CUDA when present, CPU otherwise, and clear errors for what cannot work."""

from __future__ import annotations

import pytest
import torch

from meshlm.cli import main
from meshlm.errors import ConfigError
from meshlm.parallel.device import DeviceChoice, rank_device, resolve_device


def visible_gpus(monkeypatch, n: int) -> None:
    """This process sees n CUDA GPUs (the device choice reads nothing else), no device from the environment."""
    monkeypatch.delenv("MESHLM_DEVICE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.fixture
def no_cuda(monkeypatch):
    visible_gpus(monkeypatch, 0)


@pytest.fixture
def two_gpus(monkeypatch):
    visible_gpus(monkeypatch, 2)


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


def test_cpu_kernels_are_skipped_off_the_cpu(monkeypatch):
    """Every CPU kernel call site checks the device first: with tensors elsewhere (meta stands in for cuda)
    the PyTorch path runs and no kernel is built or called."""
    from meshlm import kernels
    from meshlm.engine import paged_decode
    from meshlm.engine.paged_attention import PagedKVCache
    from meshlm.kernels import fused, gemv

    def refuse():
        raise AssertionError("a CPU kernel was asked for off the CPU")

    monkeypatch.setattr(gemv, "kernel", refuse)
    monkeypatch.setattr(fused, "kernel", refuse)
    monkeypatch.setattr(paged_decode, "kernel", refuse)
    monkeypatch.setattr(gemv, "_tried", False)  # as before the first call: linear() must not short-cut
    meta = torch.device("meta")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.empty(1, 2, 4, 64, dtype=dtype, device=meta)
        assert kernels.rms_norm(x, torch.empty(64, dtype=dtype, device=meta), 1e-5).device == meta
        cos = torch.empty(1, 2, 1, 64, dtype=dtype, device=meta)
        assert kernels.apply_rope(x, cos, cos).device == meta
        w = [gemv.Linear(64, 32, bias=False, device=meta, dtype=dtype) for _ in range(2)]
        assert gemv.linear(x[:, :, 0], w[0].weight).shape == (1, 2, 32)
        assert [o.shape for o in gemv.linear_many(x[:, :, 0], w)] == [(1, 2, 32)] * 2
        cache = PagedKVCache([0], 4, 16, 2, 64, dtype, device=meta)
        assert cache.kernel is None and cache.k.device == meta
