"""Emitting a verified token into a request's output: token ids, timing, logprobs, text, stop conditions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshlm.checkpoint.tokenizer import IncrementalDecoder, Tokenizer
from meshlm.engine.request import Request, TokenLogprob


@dataclass(frozen=True)
class Resume:
    """Where a request moved from another engine stands: its generated tokens and its text so far."""

    token_ids: tuple[int, ...] = ()
    text: str = ""  # the detokenizer's text of token_ids (an unfinished request's text is never cut)


class LiveRequest:
    """Driver-side extras of a running request: detokenizer and stop ids."""

    def __init__(self, req: Request, tokenizer: Tokenizer, stop_ids: set[int]) -> None:
        self.req = req
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_ids = stop_ids


def emit(live: LiveRequest, token: int, logits: torch.Tensor | None, now: float) -> str | None:
    """Append one verified token (logits [V]: its raw row, for logprobs); returns why the request finishes
    ("stop" or "length"), or None while it goes on. A stop string cuts the text where it starts."""
    req = live.req
    req.tokens.append(token)
    out = req.out
    out.token_ids.append(token)
    if req.first_token is None:
        req.first_token = now
        out.ttft_s = now - req.arrival
    out.decode_s = now - req.first_token
    if out.logprobs is not None:
        lp = torch.log_softmax(logits.float(), dim=-1)
        k = req.params.logprobs or 0
        top = torch.topk(lp, k) if k else None
        out.logprobs.append(TokenLogprob(token, float(lp[token]), {} if top is None else dict(
            zip(top.indices.tolist(), top.values.tolist()))))
    if token in live.stop_ids:
        return "stop"
    before = len(out.text)
    out.text += live.decoder.push(token)
    for s in req.params.stop:
        idx = out.text.find(s, max(0, before - len(s) + 1))
        if idx != -1:
            out.text = out.text[:idx]
            return "stop"
    return "length" if req.num_generated >= req.max_new else None
