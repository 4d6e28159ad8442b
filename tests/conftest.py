"""Session fixtures: tiny random-init checkpoints (built once), meshlm LLMs and HF reference models."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # `import helpers` from any test folder

from helpers import load_reference, make_checkpoint  # noqa: E402

# Property tests draw the same examples on every run (a red run means the code changed, never the draw);
# MESHLM_HYPOTHESIS=explore draws fresh ones, to search for new failures (pin each one found as an @example).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("MESHLM_HYPOTHESIS", "ci"))

torch.set_num_threads(1)  # 2-core machine: one thread is fastest for these tiny models
# The suite tests the CPU half (ranks and spawned servers inherit this); tests/gpu asks for cuda by name.
os.environ.setdefault("MESHLM_DEVICE", "cpu")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """checkpoint(kind, num_layers=None) -> folder with config.json, model.safetensors, tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple[str, int | None], Path] = {}

    def get(kind: str, num_layers: int | None = None) -> Path:
        key = (kind, num_layers)
        if key not in built:
            built[key] = make_checkpoint(kind, root / f"{kind}-{num_layers or 'default'}", num_layers)
        return built[key]

    return get


@pytest.fixture(scope="session")
def llm(checkpoint) -> Callable[..., object]:
    """llm(kind, dtype="float32") -> a meshlm.LLM on that checkpoint, loaded once per session."""
    from meshlm import LLM

    loaded: dict[tuple[str, str], LLM] = {}

    def get(kind: str, dtype: str = "float32") -> LLM:
        if (kind, dtype) not in loaded:
            loaded[(kind, dtype)] = LLM(str(checkpoint(kind)), dtype=dtype, progress=False)
        return loaded[(kind, dtype)]

    yield get
    for model in loaded.values():
        model.close()


@pytest.fixture(scope="session")
def reference(checkpoint) -> Callable[[str], torch.nn.Module]:
    """reference(kind) -> the same checkpoint loaded by transformers (fp32, eager attention)."""
    loaded: dict[str, torch.nn.Module] = {}

    def get(kind: str) -> torch.nn.Module:
        if kind not in loaded:
            loaded[kind] = load_reference(checkpoint(kind))
        return loaded[kind]

    return get


@pytest.fixture(scope="session")
def smollm2_hf():
    """The bundled SmolLM2 GGUF loaded by transformers' own GGUF loader (the reference), once."""
    import functools

    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from meshlm.checkpoint.cache import default_gguf_path

    path = default_gguf_path()
    # transformers rebuilds gguf's (pure) name map once per submodule, ~8 s here: memoize it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    """meshlm's single-process LLM on the bundled SmolLM2 (default model) dequantized to float32, as
    transformers loads it; loaded once."""
    from meshlm import LLM

    return LLM(None, dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2_q():
    """The bundled SmolLM2 as `meshlm generate` runs it by default: its Q4_1/Q8_0 blocks kept; loaded once."""
    from meshlm import LLM

    return LLM(None, progress=False)
