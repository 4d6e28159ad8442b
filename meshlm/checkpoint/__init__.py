"""Checkpoints: Hugging Face safetensors folders and GGUF files, resolved to a uniform handle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meshlm.checkpoint.source import SafetensorsSource, TensorSource
from meshlm.checkpoint.tokenizer import Tokenizer
from meshlm.config import ModelConfig
from meshlm.errors import CheckpointError


@dataclass
class Checkpoint:
    """A model's config, tensors and tokenizer, ready to load."""

    path: Path
    cfg: ModelConfig
    source: TensorSource
    tokenizer: Tokenizer


def gguf_checkpoint(path: Path) -> Checkpoint:
    """Read a GGUF file in place: each rank reads only the rows (and blocks) it owns."""
    from meshlm.checkpoint.gguf import GGUFSource, gguf_tokenizer

    source = GGUFSource(path)
    tok, tok_cfg = gguf_tokenizer(source.reader)
    return Checkpoint(path=path, cfg=ModelConfig.from_hf(source.config), source=source,
                      tokenizer=Tokenizer(tok, tok_cfg))


def _stop_ids(folder: Path, from_config: tuple[int, ...], tokenizer_eos: int | None) -> tuple[int, ...]:
    """End-of-sequence ids: config.json's, then generation_config.json's (chat models often list their
    end-of-turn tokens only there, as Llama 3 does), then the tokenizer's eos token if none was found."""
    ids = list(from_config)
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            value = None  # a broken generation config is advisory; config.json still holds the model
        for e in value if isinstance(value, list) else ([] if value is None else [value]):
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    if not ids and tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    return tuple(ids)


def open_checkpoint(model: str | Path | None = None) -> Checkpoint:
    """Open a checkpoint (folder, .gguf file, or None for the bundled default) without reading weights.

    A GGUF file is read in place (its quantized tensors can stay quantized); a folder is Hugging Face's.
    """
    if model is None:
        from meshlm.checkpoint.cache import default_gguf_path

        return gguf_checkpoint(default_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"Model path {str(path)!r} does not exist. Pass a Hugging Face folder (config.json + "
            "*.safetensors), a .gguf file, or omit --model to use the bundled SmolLM2-135M-Instruct."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(
                f"{path} is a file but not a .gguf file. meshlm loads GGUF files or Hugging Face "
                "safetensors folders (never pickle checkpoints); pass the folder that holds config.json."
            )
        return gguf_checkpoint(path)
    if not (path / "config.json").exists():
        raise CheckpointError(
            f"{path} has no config.json, so it is not a Hugging Face model folder. Point --model at the "
            "folder that holds config.json and the .safetensors files, or at a .gguf file."
        )
    folder = path
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({e}); restore the file.") from None
    cfg = ModelConfig.from_hf(raw)
    tokenizer = Tokenizer.from_folder(folder)
    eos = _stop_ids(folder, cfg.eos_token_ids, tokenizer.eos_id)
    if eos != cfg.eos_token_ids:
        cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": eos})
    return Checkpoint(path=folder, cfg=cfg, source=SafetensorsSource(folder), tokenizer=tokenizer)
