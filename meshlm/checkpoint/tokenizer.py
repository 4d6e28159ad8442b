"""Tokenizer and chat template from tokenizer.json / tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from meshlm.errors import CheckpointError, RequestError


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """Encode/decode text, render chat prompts, and detokenize incrementally for streaming."""

    def __init__(self, tok: HFTokenizer, config: dict[str, Any]) -> None:
        self.tok = tok
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(config.get("add_bos_token", False))

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from a Hugging Face folder."""
        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(
                f"{folder} has no tokenizer.json. Copy the model's tokenizer files into the folder."
            )
        cfg_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = Path(folder) / "chat_template.jinja"
        if "chat_template" not in config and template.exists():
            config["chat_template"] = template.read_text()
        return cls(HFTokenizer.from_file(str(path)), config)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for text; prepends BOS when the tokenizer config asks for it."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text for token ids."""
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's Jinja template."""
        if not self.chat_template:
            raise RequestError(
                "This model has no chat template; send a plain prompt instead of chat messages."
            )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise RequestError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        delta = full[len(self.text):]
        self.text = full
        return delta
