"""Quality of a model's weights: perplexity on a fixed text, and greedy agreement with a reference model.

Perplexity is scored the way llama.cpp's `llama-perplexity` scores it, so the two engines' figures compare
like with like: the text's tokens are cut into non-overlapping chunks of ctx tokens (a tail shorter than a
chunk is dropped), each chunk runs alone from position 0 (its first token replaced by BOS when the
tokenizer adds one), and only its second half is scored: the logits at positions ctx/2 .. ctx-2 predict
tokens ctx/2+1 .. ctx-1, so every scored token sees at least ctx/2 tokens of context.
    PPL = exp(mean NLL), NLL in nats, accumulated in float64;
    +/- = PPL x sqrt(var(NLL) / (n - 1)), llama.cpp's uncertainty.
The text ships in the package (meshlm/data/alice.txt; its source in data/README.md). float_gguf writes the
float32 copy of a quantized GGUF that `--quantize` takes (it refuses an already quantized file).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT = Path(__file__).parent / "data" / "alice.txt"


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of a model over the scored tokens of a text."""

    ppl: float
    error: float  # llama.cpp's +/- (one standard error, carried through exp)
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored: chunks x (ctx - 1 - ctx // 2)
    chunks: int
    ctx: int


@dataclass(frozen=True)
class Agreement:
    """Greedy tokens of a model against a reference's over the same prompts."""

    prompts: int
    new_tokens: int  # generated per prompt
    identical: int  # prompts whose every token matches the reference's
    prefix: float  # mean count of leading tokens that match
    forced: float  # fed the reference's tokens, the fraction of positions whose argmax is the reference's token


def float_gguf(src: str | Path, dst: str | Path) -> Path:
    """Write a copy of GGUF file src with every tensor dequantized to float32 (metadata unchanged): the
    weights `--dtype float32` loads from src, as a float model that `--quantize` accepts."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    out = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue  # the writer adds these itself
        kind, sub = f.types[0], f.types[-1]
        out.add_key_value(f.name, f.contents(), kind, sub_type=sub if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        out.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    tmp.rename(dst)
    return dst


def text_ids(tokenizer: Any, limit: int | None = None) -> list[int]:
    """Token ids of the shipped text (with BOS when the tokenizer adds one), the first `limit` of them."""
    ids = tokenizer.encode(TEXT.read_text())
    return ids if limit is None else ids[:limit]


def chunk_nll(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """float64 NLL [ctx - 1 - ctx // 2] of one chunk's scored half; logits [ctx, V], ids [ctx]."""
    ctx = len(ids)
    first = ctx // 2
    logp = torch.log_softmax(logits[first:ctx - 1].double(), dim=-1)  # [n, V]
    target = torch.tensor(ids[first + 1:ctx], dtype=torch.long)
    return -logp.gather(1, target[:, None])[:, 0]


def perplexity(llm: Any, ids: Sequence[int], ctx: int = 512, batch: int = 2) -> Perplexity:
    """Perplexity of `llm` (anything with .logits(list of id lists) -> [B, S, V]) over ids, llama.cpp's way."""
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4 tokens, not {ctx}")
    n_chunks = len(ids) // ctx
    if n_chunks < 1:
        raise ValueError(f"{len(ids)} tokens do not fill one chunk of ctx={ctx}; lower ctx or pass more text")
    bos = getattr(getattr(llm, "tokenizer", None), "bos_id", None)
    add_bos = bool(getattr(getattr(llm, "tokenizer", None), "add_bos", False)) and bos is not None
    chunks = []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        if add_bos:
            chunk[0] = bos
        chunks.append(chunk)
    nll = []
    for i in range(0, n_chunks, batch):
        group = chunks[i:i + batch]
        logits = llm.logits(group)  # [B, ctx, V] fp32
        nll += [chunk_nll(logits[j], group[j]) for j in range(len(group))]
    x = torch.cat(nll)
    n = x.numel()
    mean = x.mean().item()
    var = (x.square().mean().item() - mean * mean) if n > 1 else 0.0
    ppl = math.exp(mean)
    return Perplexity(ppl, ppl * math.sqrt(max(var, 0.0) / max(n - 1, 1)), mean, n, n_chunks, ctx)


def greedy_agreement(llm: Any, prompts: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
                     tokens: Sequence[Sequence[int]]) -> Agreement:
    """Compare `tokens` (llm's greedy continuations of prompts) with the reference model's; `forced` runs
    llm on each prompt + reference continuation and counts positions where its argmax is the next token."""
    prefixes, identical, hits, total = [], 0, 0, 0
    for p, ref, got in zip(prompts, reference, tokens):
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        prefixes.append(same)
        identical += int(same == len(ref) == len(got))
        seq = list(p) + list(ref)
        top = llm.logits([seq])[0, len(p) - 1:len(seq) - 1].argmax(-1)  # [len(ref)]
        hits += int((top == torch.tensor(list(ref))).sum())
        total += len(ref)
    n = max(len(r) for r in reference) if reference else 0
    return Agreement(len(prompts), n, identical, sum(prefixes) / max(len(prefixes), 1), hits / max(total, 1))
