"""The offline Python API: meshlm.LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import logging
import time
from typing import Iterator, Sequence

import torch

from meshlm.checkpoint import open_checkpoint
from meshlm.checkpoint.loader import build_meta, load_weights
from meshlm.config import SamplingParams
from meshlm.engine.generate import RequestOutput, generate, generate_stream
from meshlm.errors import ConfigError, RequestError
from meshlm.threads import set_threads

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for a CLI name."""
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


class LLM:
    """Load a model once and generate from it on this process."""

    def __init__(self, model: str | None = None, dtype: str = "float32", threads: int | None = None,
                 max_context: int | None = None, progress: bool = True) -> None:
        self.threads = set_threads(threads)
        self.dtype = parse_dtype(dtype)
        t0 = time.perf_counter()
        ckpt = open_checkpoint(model, progress=progress)
        self.cfg, self.tokenizer, self.path = ckpt.cfg, ckpt.tokenizer, ckpt.path
        self.model = load_weights(build_meta(self.cfg), self.cfg, ckpt.source, self.dtype, progress=progress)
        self.max_context = min(max_context or self.cfg.max_position, self.cfg.max_position)
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s in %.2fs", self.path, self.load_s)

    def encode_prompt(self, prompt: str | list[int] | list[dict[str, str]], chat: bool = False) -> list[int]:
        """Token ids for a text prompt, a list of ids, or (chat) a list of messages."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            text = self.tokenizer.apply_chat_template(prompt)  # type: ignore[arg-type]
            ids = self.tokenizer.encode(text, add_special=False)
        elif isinstance(prompt, list):
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size}).")
        elif chat:
            return self.encode_prompt([{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            raise RequestError("The prompt is empty; pass at least one token of text.")
        if len(ids) >= self.max_context:
            raise RequestError(
                f"The prompt has {len(ids)} tokens but the context window is {self.max_context}; "
                "shorten the prompt (at least one token must remain for generation)."
            )
        return ids

    def _prepare(self, prompts, sampling_params, chat):
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("No prompts given; pass at least one prompt.")
        ids = [self.encode_prompt(p, chat=chat) for p in prompts]
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(ids)
        if len(plist) != len(ids):
            raise RequestError(f"{len(plist)} sampling params for {len(ids)} prompts; pass one or one each.")
        return ids, plist

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 chat: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a batch; returns one RequestOutput per prompt, in order."""
        ids, plist = self._prepare(prompts, sampling_params, chat)
        return generate(self.model, self.cfg, self.tokenizer, ids, plist, self.max_context, self.dtype)

    def stream(self, prompt, sampling_params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[tuple[str, RequestOutput]]:
        """Yield (text delta, output so far) for a single prompt."""
        ids, plist = self._prepare([prompt], sampling_params, chat)
        for _, delta, outs in generate_stream(self.model, self.cfg, self.tokenizer, ids, plist,
                                              self.max_context, self.dtype):
            yield delta, outs[0]

    @torch.inference_mode()
    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Full-sequence logits [B, S, V] (fp32) for right-padded prompts (no cache), for checks."""
        from meshlm.models.layers import CausalNoCache

        lens = [len(t) for t in token_ids]
        s = max(lens)
        tokens = torch.zeros(len(token_ids), s, dtype=torch.long)
        mask = torch.zeros(len(token_ids), s, dtype=torch.bool)
        for i, t in enumerate(token_ids):
            tokens[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = True
        positions = torch.arange(s).expand(len(token_ids), s)
        return self.model(tokens, positions, CausalNoCache(mask)).float()
