"""Offline generation: prefill a batch, then decode with a preallocated KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from meshlm.checkpoint.tokenizer import IncrementalDecoder, Tokenizer
from meshlm.config import ModelConfig, SamplingParams
from meshlm.engine.request import RequestOutput
from meshlm.engine.sampler import make_generator, sample
from meshlm.engine.static_cache import StaticKVCache


@dataclass
class _Seq:
    out: RequestOutput
    params: SamplingParams
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    stop_ids: set[int]
    limit: int  # max generated tokens (max_tokens clipped to the context)


def _finish(seq: _Seq, token: int, delta: str) -> str:
    """Record a token; return the text to emit, setting finish_reason when the sequence ends."""
    out = seq.out
    out.token_ids.append(token)
    if token in seq.stop_ids:
        out.finish_reason = "stop"
        return ""
    before = len(out.text)
    out.text += delta
    for s in seq.params.stop:
        idx = out.text.find(s, max(0, before - len(s) + 1))
        if idx != -1:
            out.text = out.text[:idx]
            out.finish_reason = "stop"
            return out.text[before:]
    if len(out.token_ids) >= seq.limit:
        out.finish_reason = "length"
    return delta


@torch.inference_mode()
def generate_stream(model: nn.Module, cfg: ModelConfig, tokenizer: Tokenizer, prompts: list[list[int]],
                    params: list[SamplingParams], max_context: int,
                    dtype: torch.dtype) -> Iterator[tuple[int, str, list[RequestOutput]]]:
    """Yield (request index, text delta, outputs) as tokens appear; outputs fill in place."""
    eos = set(cfg.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    seqs = []
    for ids, p in zip(prompts, params):
        stop = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
        out = RequestOutput(f"req-{len(seqs)}", list(ids))
        seqs.append(_Seq(out, p, IncrementalDecoder(tokenizer), make_generator(p.seed), stop,
                         min(p.max_tokens, max_context - len(ids))))
    lens = torch.tensor([len(p) for p in prompts])
    b, s_max = len(prompts), int(lens.max())
    total = min(max_context, max(len(q.out.prompt_token_ids) + q.limit for q in seqs))
    kv_heads = model.layers["0"].self_attn.k_proj.out_features // cfg.head_dim
    cache = StaticKVCache(len(model.layers), b, total, kv_heads, cfg.head_dim, dtype,
                          window=cfg.sliding_window)
    # Prefill: right-padded batch; each row's logits come from its last real token.
    tokens = torch.zeros(b, s_max, dtype=torch.long)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = torch.tensor(ids)
    positions = torch.arange(s_max).expand(b, s_max)
    t0 = time.perf_counter()
    cache.prepare(positions)
    logits = model(tokens, positions, cache, logits_index=(lens - 1)[:, None])[:, 0]  # [B, V]
    pos = lens.clone()  # position of the next token per row
    live = list(range(b))
    first = True
    while live:
        next_tokens = torch.zeros(b, dtype=torch.long)
        now = time.perf_counter()
        for i in live:
            seq = seqs[i]
            tok = sample(logits[i], seq.params, seq.generator)
            next_tokens[i] = tok
            if first:
                seq.out.ttft_s = now - t0
            else:
                seq.out.decode_s = now - t0 - seq.out.ttft_s
            delta = _finish(seq, tok, seq.decoder.push(tok))
            yield i, delta, [q.out for q in seqs]
        first = False
        live = [i for i in live if seqs[i].out.finish_reason is None]
        if not live:
            break
        step_pos = pos.clone()[:, None]  # [B, 1]; finished rows recompute harmlessly
        step_pos.clamp_(max=total - 1)
        cache.prepare(step_pos, kv_len=int(step_pos[live].max()) + 1)
        logits = model(next_tokens[:, None], step_pos, cache)[:, -1]  # [B, V]
        pos += 1


def generate(model: nn.Module, cfg: ModelConfig, tokenizer: Tokenizer, prompts: list[list[int]],
             params: list[SamplingParams], max_context: int, dtype: torch.dtype,
             on_token: Callable[[int, str], None] | None = None) -> list[RequestOutput]:
    """Run generate_stream to completion."""
    outs: list[RequestOutput] = []
    for i, delta, outs in generate_stream(model, cfg, tokenizer, prompts, params, max_context, dtype):  # noqa: B007
        if on_token:
            on_token(i, delta)
    return outs
