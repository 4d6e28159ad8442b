"""Pipeline-parallel generation: every rank runs this loop for its stage; work flows stage to stage.

Stage 0 drives. It prefills each micro-batch (a prompt cut into chunks when token-level pipelining is
on), then decodes whichever micro-batch's tokens come back next, so with M >= P micro-batches stage s
works on micro-batch m while stage s + 1 works on m - 1. Each message to the next stage is a header
(kind, micro-batch, step, chunk [a, b), rows, one live flag per row) followed by the hidden states
[B, b - a, H]; the header alone says what to compute, so later stages need no other control. The last
stage samples (it holds the head, so its logits are the full distribution on every tp rank) and sends
the tokens back to stage 0, which runs the stop rules and decides the next step. Each micro-batch keeps
its own KV cache on every stage, indexed by this stage's layers only.

Micro-batches decode like the one-device loop of engine/generate.py: every row of a micro-batch runs
until the whole micro-batch finishes (finished rows recompute harmlessly), so a sequence's tokens equal
those of a solo run.
"""

from __future__ import annotations

import resource
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from meshlm.checkpoint.tokenizer import IncrementalDecoder, Tokenizer
from meshlm.config import ModelConfig, SamplingParams
from meshlm.engine.generate import _finish, _Seq
from meshlm.engine.request import RequestOutput
from meshlm.engine.sampler import make_generator, sample
from meshlm.engine.static_cache import StaticKVCache
from meshlm.parallel.comm import STATS, Groups
from meshlm.parallel.pipeline import (
    PipelineSpec,
    StageLink,
    StagePlan,
    attention_ratio,
    auto_chunks,
    chunk_bounds,
)
from meshlm.parallel.styles import even_partition
from meshlm.telemetry.trace import Timeline

END, PREFILL, DECODE = 0, 1, 2
HEADER = 6  # kind, micro-batch, step, chunk start, chunk stop, rows; then one live flag per row


class StageKV:
    """Attention backend of one micro-batch on one stage: global layer ids map to this stage's cache slots."""

    def __init__(self, layer_ids: list[int], batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, window: int | None) -> None:
        self.slot = {lid: i for i, lid in enumerate(layer_ids)}
        self.cache = StaticKVCache(len(layer_ids), batch, max_len, kv_heads, head_dim, dtype, window=window)

    def prepare(self, positions: torch.Tensor, kv_len: int | None = None) -> None:
        """positions [B, S] of the next forward."""
        self.cache.prepare(positions, kv_len)

    def __call__(self, layer: int, q, k, v):
        return self.cache(self.slot[layer], q, k, v)

    @property
    def nbytes(self) -> int:
        """Bytes of K and V."""
        return 2 * self.cache.k.numel() * self.cache.k.element_size()


@dataclass
class MicroBatch:
    """One micro-batch as this stage sees it."""

    index: int
    rows: list[int]  # request indices
    tokens: torch.Tensor  # [B, S] right-padded prompt ids
    lens: torch.Tensor  # [B] prompt lengths
    total: int  # cache length: prompt + generation limit, capped at the context
    chunks: list[tuple[int, int]]  # prefill pieces [a, b) of range(S)
    cache: StageKV
    live: torch.Tensor  # [B] bool: rows still generating
    next_tokens: torch.Tensor  # [B] the tokens the next decode step feeds (stage 0)
    step: int = 0  # 0 = prefill, k = k-th decode step
    logits: torch.Tensor | None = None  # [B, V] prefill logits collected over chunks (last stage)


class PipelineRunner:
    """Generation on this rank's stage (pp >= 2); every rank calls stream() with the same arguments."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, tokenizer: Tokenizer, plan: StagePlan,
                 groups: Groups, spec: PipelineSpec, max_context: int, dtype: torch.dtype, rank: int) -> None:
        self.model, self.cfg, self.tokenizer, self.plan = model, cfg, tokenizer, plan
        self.groups, self.spec, self.max_context = groups, spec, max_context
        self.dtype, self.rank = dtype, rank
        self.layer_ids = [int(k) for k in model.layers.keys()]
        self.kv_heads = next(iter(model.layers.values())).self_attn.k_proj.out_features // cfg.head_dim
        self.weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        self.timeline = Timeline()
        self.link = StageLink(groups.pp, self.timeline)
        self.report: dict = {}
        self.max_rows = 0  # rows of the largest micro-batch of the current run (fixes the header size)

    def configure(self, **changes) -> None:
        """Change run-time settings (micro_batches, prefill_chunks, min_chunk, attention_speed, keep_logits)."""
        self.spec = replace(self.spec, **changes)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Run to completion; outputs on stage 0 (the other stages return an empty list)."""
        outs: list[RequestOutput] = []
        for _, _, latest in self.stream(prompts, params):
            outs = latest
        return outs

    @torch.inference_mode()
    def stream(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[tuple]:
        """Yield (request index, text delta, outputs) on stage 0 as tokens return; other stages just run."""
        seqs = self._seqs(prompts, params)
        mbs = self._micro_batches(prompts, seqs)
        self.groups.world.barrier()  # every rank's clock starts together: the trace rows line up
        self.timeline = self.link.timeline = Timeline()
        self._kept: dict[int, torch.Tensor] = {}
        tp_before = self._tp_seconds()
        if self.plan.first:
            yield from self._drive(mbs, seqs)
        else:
            self._follow(mbs, seqs)
        self.link.flush()
        self.timeline.stop()
        self.report = {
            "rank": self.rank, "stage": self.plan.index, "tp_index": self.groups.tp.index,
            "layers": (self.plan.start, self.plan.stop), "micro_batches": len(mbs),
            "chunks": [len(mb.chunks) for mb in mbs], "weight_mb": self.weight_mb,
            "kv_mb": sum(mb.cache.nbytes for mb in mbs) / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tp_comm_s": self._tp_seconds() - tp_before, "timeline": self.timeline.to_dict(),
        }
        if self._kept:
            self.report["prefill_logits"] = self._kept

    # -- set-up ----------------------------------------------------------------------------------------
    def _seqs(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[_Seq]:
        eos = set(self.cfg.eos_token_ids) | ({self.tokenizer.eos_id} if self.tokenizer.eos_id is not None
                                              else set())
        return [_Seq(RequestOutput(f"req-{i}", list(ids)), p, IncrementalDecoder(self.tokenizer),
                     make_generator(p.seed), set(p.stop_token_ids) | (set() if p.ignore_eos else eos),
                     min(p.max_tokens, self.max_context - len(ids)))
                for i, (ids, p) in enumerate(zip(prompts, params))]

    def _micro_batches(self, prompts: list[list[int]], seqs: list[_Seq]) -> list[MicroBatch]:
        m = min(len(prompts), self.spec.micro_batches or self.plan.count)
        ratio = attention_ratio(self.cfg, self.spec.attention_speed)
        out = []
        for k, (lo, hi) in enumerate(even_partition(len(prompts), m)):
            rows = list(range(lo, hi))
            lens = torch.tensor([len(prompts[i]) for i in rows])
            s = int(lens.max())
            tokens = torch.zeros(len(rows), s, dtype=torch.long)
            for j, i in enumerate(rows):
                tokens[j, : len(prompts[i])] = torch.tensor(prompts[i])
            total = min(self.max_context, max(len(prompts[i]) + seqs[i].limit for i in rows))
            n = self.spec.prefill_chunks or auto_chunks(s, self.plan.count, m, self.spec.min_chunk)
            cache = StageKV(self.layer_ids, len(rows), total, self.kv_heads, self.cfg.head_dim, self.dtype,
                            self.cfg.sliding_window)
            out.append(MicroBatch(k, rows, tokens, lens, total, chunk_bounds(s, n, ratio,
                                                                             self.cfg.sliding_window),
                                  cache, torch.ones(len(rows), dtype=torch.bool),
                                  torch.zeros(len(rows), dtype=torch.long)))
        self.max_rows = max(len(mb.rows) for mb in out)
        return out

    # -- the loops ---------------------------------------------------------------------------------------
    def _drive(self, mbs: list[MicroBatch], seqs: list[_Seq]) -> Iterator[tuple]:
        """Stage 0: prefill every micro-batch, then decode each one as its tokens return."""
        start, outs, stopped = time.perf_counter(), [q.out for q in seqs], False
        for mb in mbs:
            for a, b in mb.chunks:
                self._run(mb, PREFILL, a, b, mb.tokens[:, a:b], seqs)
        inflight = deque(mbs)
        while inflight:
            mb = inflight.popleft()
            toks = self._take_tokens(mb)
            with self.timeline.span("compute", chained=True, mb=mb.index, step=mb.step, what="accept"):
                events = self._accept(mb, toks, seqs, time.perf_counter() - start)
            t = time.perf_counter()
            try:
                for i, delta in events if not stopped else ():
                    yield i, delta, outs
            except GeneratorExit:  # the caller stopped reading: drain what is in flight, start nothing new
                stopped = True
            self.timeline.step_away(t)
            if bool(mb.live.any()) and not stopped:
                mb.step += 1
                self._run(mb, DECODE, 0, 1, mb.next_tokens[:, None], seqs)
                inflight.append(mb)
        self.link.send(self._header(END, None, 0, 0), 1)

    def _follow(self, mbs: list[MicroBatch], seqs: list[_Seq]) -> None:
        """Stages 1..P-1: run whatever the previous stage sends, until END."""
        prev = self.plan.index - 1
        while True:
            hdr = self.link.recv((HEADER + self.max_rows,), torch.long, prev, span="idle")
            kind, m, step, a, b, rows = hdr[:HEADER].tolist()
            if kind == END:
                if not self.plan.last:
                    self.link.send(hdr, self.plan.index + 1)
                return
            mb = mbs[m]
            mb.step, mb.live = step, hdr[HEADER: HEADER + rows].bool()
            x = self.link.recv((rows, b - a, self.cfg.hidden_size), self.dtype, prev, mb=m, step=step)
            self._run(mb, kind, a, b, x, seqs)

    def _run(self, mb: MicroBatch, kind: int, a: int, b: int, x: torch.Tensor, seqs: list[_Seq]) -> None:
        """Compute one piece on this stage; pass hidden states on, or (last stage) tokens back to stage 0."""
        what = f"prefill {a}:{b}" if kind == PREFILL else f"decode {mb.step}"
        with self.timeline.span("compute", chained=True, mb=mb.index, what=what):
            out = self._forward(mb, kind, a, b, x)
            if not self.plan.last:
                hdr = self._header(kind, mb, a, b)
            else:
                toks = self._sample(mb, kind, a, b, out, seqs)
                msg = None if toks is None else torch.cat([torch.tensor([mb.index, mb.step]), toks])
        if not self.plan.last:
            self.link.send(hdr, self.plan.index + 1, mb=mb.index)
            self.link.send(out, self.plan.index + 1, mb=mb.index, what=what)
        elif msg is not None:
            self.link.send(msg, 0, mb=mb.index, what="tokens")

    def _forward(self, mb: MicroBatch, kind: int, a: int, b: int, x: torch.Tensor) -> torch.Tensor:
        """x: token ids [B, S] (stage 0) or hidden [B, S, H] -> hidden, or logits on the last stage."""
        rows = len(mb.rows)
        if kind == PREFILL:
            positions = torch.arange(a, b).expand(rows, b - a)  # [B, S]
            mb.cache.prepare(positions)
            index = (mb.lens - 1 - a).clamp(0, b - a - 1)[:, None] if self.plan.last else None  # [B, 1]
            return self.model(x, positions, mb.cache, logits_index=index)
        positions = (mb.lens + mb.step - 1).clamp(max=mb.total - 1)[:, None]  # [B, 1]
        mb.cache.prepare(positions, kv_len=int(positions[mb.live].max()) + 1)
        return self.model(x, positions, mb.cache)

    def _sample(self, mb: MicroBatch, kind: int, a: int, b: int, out: torch.Tensor,
                seqs: list[_Seq]) -> torch.Tensor | None:
        """Last stage: tokens [max_rows] for the live rows, or None while a prefill has chunks to come."""
        if kind == PREFILL:
            if mb.logits is None:
                mb.logits = out.new_zeros(len(mb.rows), out.shape[-1])
            hit = (mb.lens - 1 >= a) & (mb.lens - 1 < b)  # rows whose last prompt token is in [a, b)
            mb.logits[hit] = out[hit, 0]
            if b < mb.tokens.shape[1]:
                return None
            logits = mb.logits
            if self.spec.keep_logits:
                self._kept[mb.index] = logits.float().clone()
        else:
            logits = out[:, -1]  # [B, V]
        toks = torch.zeros(self.max_rows, dtype=torch.long)
        for j, i in enumerate(mb.rows):
            if mb.live[j]:
                toks[j] = sample(logits[j], seqs[i].params, seqs[i].generator)
        return toks

    def _take_tokens(self, mb: MicroBatch) -> torch.Tensor:
        """Stage 0: the tokens the last stage sampled for mb's latest step (waiting for them is idle)."""
        msg = self.link.recv((2 + self.max_rows,), torch.long, self.plan.count - 1, span="idle",
                             mb=mb.index, what="tokens")
        assert (int(msg[0]), int(msg[1])) == (mb.index, mb.step), "pipeline messages out of order"
        return msg[2:]

    def _accept(self, mb: MicroBatch, toks: torch.Tensor, seqs: list[_Seq], now: float) -> list:
        """Stage 0: record each live row's token, apply stop rules; returns (index, delta) events."""
        events = []
        for j, i in enumerate(mb.rows):
            if not mb.live[j]:
                continue
            seq, tok = seqs[i], int(toks[j])
            mb.next_tokens[j] = tok
            if mb.step == 0:
                seq.out.ttft_s = now
            else:
                seq.out.decode_s = now - seq.out.ttft_s
            events.append((i, _finish(seq, tok, seq.decoder.push(tok))))
            mb.live[j] = seq.out.finish_reason is None
        return events

    def _header(self, kind: int, mb: MicroBatch | None, a: int, b: int) -> torch.Tensor:
        hdr = torch.zeros(HEADER + self.max_rows, dtype=torch.long)
        if mb is not None:
            hdr[:HEADER] = torch.tensor([kind, mb.index, mb.step, a, b, len(mb.rows)])
            hdr[HEADER: HEADER + len(mb.rows)] = mb.live
        return hdr

    @staticmethod
    def _tp_seconds() -> float:
        return sum(v["seconds"] for k, v in STATS.snapshot().items() if k.startswith("tp/"))
