"""Draft-model proposers: a smaller checkpoint with the target's tokenizer ("draft"), or the target's own
checkpoint quantized to int4 ("self-int4"), run single-device in the driver process.

The draft reuses the engine's parts: a world-size-1 Worker (checkpoint loader, sharding-free model, packed
linears; no process group, so it coexists with a target that owns this process's default group at tp > 1),
its ModelRunner and a BlockManager of its own over a small paged KV pool. Per request it keeps the tokens
whose KV it holds. propose() first rolls that back to the longest common prefix with req.tokens (the
target rejected the rest), then feeds the tokens it lacks (the target's accepted and bonus tokens; the
whole prompt the first time) and draws k tokens in k batched steps: catch-up + first draft, then one token
per step. Invariant: state.tokens == the tokens whose KV sits in state.table, positions 0..len-1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meshlm.checkpoint import open_checkpoint
from meshlm.checkpoint.quantized import quantized_types
from meshlm.config import SamplingParams
from meshlm.engine.kv_cache import BlockManager
from meshlm.engine.paged_attention import SeqInput, StepInput
from meshlm.engine.request import Request
from meshlm.engine.sampler import DRAFT, position_generator, target_probs
from meshlm.engine.speculative import Proposal
from meshlm.errors import ConfigError
from meshlm.parallel.comm import single_process_groups
from meshlm.parallel.device import resolve_device

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
KV_FRACTION = 0.05  # of this process's free memory (its GPU's, or its share of the host's) for the draft's pool
MAX_BLOCKS = 4096  # 65,536 token slots: plenty of room for a batch of drafts
FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K"}  # GGUF types a self-int4 draft runs as stored (Q4_K loads as Q4_1)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def fit_vocab(p: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Weights [V_draft] as probabilities over the target's vocabulary [vocab_size]: zero-padded or cut, then
    normalised to sum 1 (None when the draft put all its mass on ids the target lacks)."""
    p = torch.nn.functional.pad(p, (0, vocab_size - p.shape[-1])) if p.shape[-1] < vocab_size else p[:vocab_size]
    total = float(p.sum())
    return p / total if total > 0 else None


def check_same_tokenizer(target_model: str | Path | None, draft_model: str | Path | None) -> None:
    """Refuse a draft whose tokenizer differs from the target's (vocabulary, added and special tokens)."""
    target, draft = open_checkpoint(target_model), open_checkpoint(draft_model)
    tt, dt = target.tokenizer, draft.tokenizer

    def added(tok) -> dict[int, tuple[str, bool]]:
        return {i: (t.content, t.special) for i, t in tok.tok.get_added_tokens_decoder().items()}

    diffs = []
    tv, dv = tt.tok.get_vocab(with_added_tokens=True), dt.tok.get_vocab(with_added_tokens=True)
    if tv != dv:
        only_t, only_d = sorted(set(tv.items()) - set(dv.items())), sorted(set(dv.items()) - set(tv.items()))
        diffs.append(f"vocabularies differ ({len(tv)} vs {len(dv)} tokens; first target-only entry "
                     f"{only_t[0] if only_t else None}, first draft-only entry {only_d[0] if only_d else None})")
    if added(tt) != added(dt):
        diffs.append("added/special tokens differ")
    for what in ("bos_token", "eos_token"):
        if getattr(tt, what) != getattr(dt, what):
            diffs.append(f"{what} {getattr(tt, what)!r} vs {getattr(dt, what)!r}")
    if diffs:
        raise ConfigError(
            f"The draft model {draft.path} does not share the tokenizer of the target {target.path}: "
            f"{'; '.join(diffs)}. A draft must propose the target's token ids: pick a draft of the same model "
            "family (same tokenizer.json), or use --speculative ngram or self-int4.")


def self_draft_quantize(model: str | Path | None, quantize: str) -> str | None:
    """The --quantize a self-draft of `model` loads with: `quantize` for float weights, None for a GGUF that is
    already 4-bit (run as stored); any other quantized file is refused."""
    ckpt = open_checkpoint(model)
    kinds = quantized_types(ckpt.source)
    if not kinds:
        return quantize
    if kinds & FOUR_BIT:
        log.warning("self-int4: %s is already 4-bit (%s); the draft runs it as stored, so each draft step costs "
                    "about a target step unless the target runs other weights (a float checkpoint)",
                    ckpt.path.name, ", ".join(sorted(kinds)))
        return None
    raise ConfigError(
        f"self-int4 needs float weights (quantized to int4 at load) or a 4-bit GGUF, but {ckpt.path} holds "
        f"{', '.join(sorted(kinds))}; meshlm does not requantize quantized weights. Run the target from a float "
        "checkpoint (safetensors or an F16/F32 GGUF), or use --speculative draft:PATH or ngram.")


@dataclass
class _Seq:
    """What the draft holds of one request."""

    tokens: list[int] = field(default_factory=list)  # KV computed for these, at positions 0..len-1
    table: list[int] = field(default_factory=list)  # the draft pool's blocks holding them


class DraftProposer:
    """Proposes k tokens per request with a draft model (or the target quantized to int4) on one device."""

    def __init__(self, model: str, quantize: str | None, vocab_size: int, threads: int | None = None,
                 device: str | None = None, *, num_blocks: int | None = None) -> None:
        from meshlm.engine.worker import Worker, WorkerSpec  # worker imports the engine, which holds proposers

        self.name = "draft" if quantize is None else "self-int4"
        if quantize is not None:
            quantize = self_draft_quantize(model, quantize)
        # threads None: keep this process's count (the target's rank 0 set it), not the draft's own default
        spec = WorkerSpec(model=model, quantize=quantize, threads=threads or torch.get_num_threads(),
                          device=resolve_device(device))
        self.worker = Worker(spec, single_process_groups())
        self.vocab_size = vocab_size
        self.max_context = self.worker.max_context
        if num_blocks is None:
            budget = self.worker.kv_budget_bytes(KV_FRACTION) // self.worker.kv_block_bytes(BLOCK_SIZE)
            num_blocks = max(1, min(int(budget), MAX_BLOCKS))
        self.worker.allocate_kv(num_blocks, BLOCK_SIZE)
        self.runner = self.worker.runner
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE)
        self.seqs: dict[str, _Seq] = {}
        log.info("%s proposer: %s, KV pool %d blocks x %d tokens", self.name, self.worker.path, num_blocks,
                 BLOCK_SIZE)

    def backlog(self, req: Request) -> int:
        """Tokens of req the draft lacks (its prompt on a first call): their KV is computed before it proposes."""
        s = self.seqs.get(req.id)
        return len(req.tokens) - min(len(s.tokens) if s is not None else 0, len(req.tokens) - 1)

    def release(self, request_id: str) -> None:
        """Free the request's draft KV blocks and state (finished, aborted or preempted)."""
        s = self.seqs.pop(request_id, None)
        if s is not None:
            self.blocks.release(s.table)

    def _rollback(self, s: _Seq, keep: int) -> None:
        """Keep the KV of s.tokens[:keep]; blocks past it go back to the pool."""
        del s.tokens[keep:]
        tail = s.table[self.blocks.blocks_for(keep):]
        del s.table[len(s.table) - len(tail):]
        self.blocks.release(tail)

    def _plan(self, req: Request, k: int) -> tuple[_Seq, list[int], int]:
        """Roll back to req.tokens, reserve slots; -> (state, tokens to feed first, tokens it may propose)."""
        s = self.seqs.setdefault(req.id, _Seq())
        n = len(req.tokens)
        self._rollback(s, common_prefix(s.tokens, req.tokens[:-1]))  # the last token is always fed
        k = min(k, self.max_context - n)  # the target verifies up to position n + k - 1
        room = (len(s.table) + self.blocks.num_free) * BLOCK_SIZE  # slots this request could hold
        k = min(k, room - n + 1)  # drafting k feeds positions up to n + k - 2
        if k <= 0 or not self.blocks.grow(s.table, n + k - 1):
            return s, [], 0
        return s, req.tokens[len(s.tokens):], k

    @torch.inference_mode()
    def propose(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[Proposal]:
        """Up to ks[i] draft tokens after each req.tokens (greedy: argmax, probs None; sampled: drawn from
        probs [k, vocab_size] after the request's temperature / top-k / top-p)."""
        plans = [self._plan(r, k) if k > 0 else (None, [], 0) for r, k in zip(reqs, ks)]
        feeds = {i: f for i, (_, f, k) in enumerate(plans) if k > 0}
        drafted: list[list[int]] = [[] for _ in reqs]
        rows: list[list[torch.Tensor]] = [[] for _ in reqs]
        while feeds:
            order = list(feeds)
            tokens: list[int] = []
            seqs, offsets = [], []
            for i in order:
                s = plans[i][0]
                seqs.append(SeqInput(len(tokens), len(s.tokens), len(feeds[i]), tuple(s.table)))
                tokens.extend(feeds[i])
                offsets.append(len(tokens) - 1)
            logits = self.runner.forward(StepInput(tuple(tokens), tuple(seqs), tuple(offsets)))  # [B, V_draft]
            best = logits[:, :self.vocab_size].argmax(-1).tolist()
            for row, i in enumerate(order):
                s, params = plans[i][0], reqs[i].params
                s.tokens.extend(feeds.pop(i))
                token = best[row] if params.greedy else self._draw(logits[row], params, len(s.tokens), rows[i])
                if token is None:
                    continue
                drafted[i].append(token)
                if len(drafted[i]) < plans[i][2]:
                    feeds[i] = [token]
        return [Proposal(tuple(d), torch.stack(r) if r else None, len(f)) for d, r, (_, f, _) in
                zip(drafted, rows, plans)]

    def _draw(self, logits: torch.Tensor, params: SamplingParams, position: int,
              rows: list[torch.Tensor]) -> int | None:
        """The token at `position` drawn from the draft's distribution over the target vocabulary (logits [V]);
        its row goes to rows."""
        p = fit_vocab(target_probs(logits.cpu(), params), self.vocab_size)  # [vocab_size] fp32
        if p is None:
            return None
        rows.append(p)
        # keyed by (seed, position): a draft token is a function of the request's seed and its context only
        return int(torch.multinomial(p, 1, generator=position_generator(params.seed, position, DRAFT)))
