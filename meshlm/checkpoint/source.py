"""Tensor sources: a uniform way to read whole tensors or one contiguous slice of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from meshlm.errors import CheckpointError


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) along dimension `dim` of a checkpoint tensor."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class ExpertPick:
    """The experts of a stacked expert tensor one rank reads (ids in its local slot order), each sliced by part."""

    ids: tuple[int, ...]
    part: Slice | None = None


class TensorSource(Protocol):
    """Read-only access to named checkpoint tensors (names as in Hugging Face checkpoints)."""

    def names(self) -> list[str]:
        """All tensor names."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of a tensor."""
        ...

    def read(self, name: str, part: Slice | None = None) -> torch.Tensor:
        """The tensor, or only the slice `part` of it (nothing else is read)."""
        ...


class SafetensorsSource:
    """One or more .safetensors files, memory-mapped; slices read only their bytes."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise CheckpointError(
                f"No .safetensors weights in {folder}. meshlm loads safetensors or GGUF only (never "
                "pickle .bin files); convert the checkpoint with `save_pretrained(safe_serialization=True)`."
            )
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            path = folder / f
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(
                    f"Cannot read {path}: {e}. The file is truncated or not safetensors; "
                    "download or convert it again."
                ) from None
            self._handles[f] = handle
            for k in handle.keys():
                self._where[k] = f
        self._where.update({k: v for k, v in weight_map.items() if v in self._handles})

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def read(self, name: str, part: Slice | None = None) -> torch.Tensor:
        try:
            sl = self._handles[self._where[name]].get_slice(name)
            if part is None:
                return sl[:]
            index = [slice(None)] * len(sl.get_shape())
            index[part.dim] = slice(part.start, part.stop)
            return sl[tuple(index)]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"Cannot read tensor {name!r} from {self._where.get(name)}: {e}. The file is truncated "
                "or corrupt; download or convert it again."
            ) from None
