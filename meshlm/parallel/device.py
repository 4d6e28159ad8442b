"""Which device each rank computes on, and the torch.distributed backend that carries its tensors.

A rank runs on `cuda:<local rank>` when the launch asks for CUDA (NCCL carries the tensors of every
group, gloo the Python objects and control messages), else on the CPU (gloo, or shared memory between
ranks of one host). "auto" takes CUDA when this process sees a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from meshlm.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class DeviceChoice:
    """The device kind every rank of a launch uses and its backend (resolved before any process starts)."""

    kind: str = "cpu"  # cpu | cuda
    backend: str = "gloo"  # gloo | nccl: what carries tensors between ranks

    @property
    def pg_backend(self) -> str:
        """The backend string for init_process_group / new_group: NCCL groups keep gloo for CPU objects."""
        return "cpu:gloo,cuda:nccl" if self.backend == "nccl" else "gloo"


def resolve_device(device: str | None = None, backend: str | None = None, world_size: int = 1) -> DeviceChoice:
    """Check a requested device (None: $MESHLM_DEVICE, else auto) and backend against this host."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)  # torchrun sets it
    device = device or os.environ.get("MESHLM_DEVICE") or "auto"
    if device not in DEVICES:
        raise ConfigError(f"device {device!r} is unknown; use one of {', '.join(DEVICES)}.")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}.")
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_cuda and backend != "gloo" else "cpu"
    if device == "cuda":
        if not has_cuda:
            raise ConfigError("--device cuda: this process sees no CUDA GPU (torch.cuda.is_available() is "
                              f"False; torch {torch.__version__}). Use --device cpu, or install a CUDA build "
                              "of torch on a machine with a GPU.")
        if backend == "gloo":
            raise ConfigError("--backend gloo cannot carry CUDA tensors between ranks; use --backend nccl "
                              "(the default on CUDA) or --device cpu.")
        if ranks_here > torch.cuda.device_count():
            raise ConfigError(f"{ranks_here} ranks on this host need {ranks_here} GPUs, but only "
                              f"{torch.cuda.device_count()} are visible; lower tp x pp, or use --device cpu.")
        return DeviceChoice("cuda", "nccl")
    if backend == "nccl":
        why = "this process sees no CUDA GPU" if not has_cuda else "the ranks run on the CPU (--device cpu)"
        raise ConfigError(f"--backend nccl needs CUDA tensors, but {why}. Use --backend gloo (the default "
                          "on CPU), or --device cuda on a machine with GPUs.")
    return DeviceChoice("cpu", "gloo")


def local_rank(rank: int) -> int:
    """This process's index among the ranks of its host: $LOCAL_RANK under torchrun, else the rank itself."""
    return int(os.environ.get("LOCAL_RANK", rank))


def rank_device(kind: str, rank: int) -> torch.device:
    """The device this rank computes on; on CUDA it also becomes the current device (NCCL needs that)."""
    if kind != "cuda":
        return torch.device("cpu")
    index = local_rank(rank)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"rank {rank} (local rank {index}) has no GPU: this host sees "
                          f"{torch.cuda.device_count()}. Start at most that many ranks per host.")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device
