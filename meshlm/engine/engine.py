"""LLMEngine: add_request / abort / step / generate, over a scheduler, a block manager and the ranks."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable
from functools import partial

import torch

from meshlm.checkpoint.tokenizer import Tokenizer
from meshlm.config import ModelConfig, SamplingParams
from meshlm.engine import positions
from meshlm.engine.emit import LiveRequest, Resume, emit
from meshlm.engine.engine_config import EngineConfig, EngineStats
from meshlm.engine.kv_cache import BlockManager
from meshlm.engine.paged_attention import SeqInput, StepInput
from meshlm.engine.positions import PositionLedger
from meshlm.engine.request import Request, RequestOutput, Status
from meshlm.engine.scheduler import Scheduler, SchedulerOutput
from meshlm.engine.spec_engine import Speculator
from meshlm.engine.spec_policy import SpecCounters
from meshlm.engine.speculative import Proposer
from meshlm.engine.verify import verify
from meshlm.errors import ConfigError, RequestError
from meshlm.parallel.launch import RankFailure
from meshlm.parallel.pipeline import PipelineSpec, prompt_chunks
from meshlm.telemetry.trace import write_chrome_trace

log = logging.getLogger(__name__)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), or 4 GiB when unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def host_kv_budget_bytes(fraction: float, ranks_here: int) -> int:
    """The default KV pool of a CPU rank: `fraction` of the host's available memory, shared by its ranks."""
    return int(fraction * available_memory_bytes() / max(1, ranks_here))


def _all_decode(plan: SchedulerOutput) -> bool:
    """True when every grant of the step is one known token that samples: no prompt (chunk) in it."""
    return all(it.num_new == 1 and it.samples for it in plan.items)


class LLMEngine:
    """Continuous batching over every rank of an Executor."""

    def __init__(self, executor, cfg: ModelConfig, tokenizer: Tokenizer, max_context: int,
                 engine_cfg: EngineConfig | None = None, pipeline: PipelineSpec | None = None,
                 proposer: Proposer | None = None) -> None:
        self.executor, self.cfg, self.tokenizer = executor, cfg, tokenizer
        self.max_context = max_context
        self.ecfg = engine_cfg or EngineConfig()
        bs = self.ecfg.block_size
        per_block = max(executor.call_all("kv_block_bytes", bs))
        budget = (self.ecfg.kv_cache_mb * 2**20 if self.ecfg.kv_cache_mb is not None
                  else min(executor.call_all("kv_budget_bytes", self.ecfg.kv_cache_fraction)))
        # At cp > 1 a block id covers bs tokens on each of the cp ranks (parallel/context.py: kv_slot).
        cp = executor.cp
        # No point in more blocks than max_num_seqs full contexts.
        cap = self.ecfg.scheduler.max_num_seqs * -(-max_context // (bs * cp))
        num_blocks = min(int(budget // per_block), cap)
        if num_blocks < 1:
            raise ConfigError(
                f"The KV cache budget ({budget / 2**20:.1f} MiB per rank) holds no {bs}-token block "
                f"({per_block / 2**20:.2f} MiB); raise --kv-cache-mb."
            )
        executor.call("allocate_kv", num_blocks, bs)
        self.blocks = BlockManager(num_blocks, bs * cp)
        self.depth = min(executor.depth, self.ecfg.pipeline_depth or executor.depth)  # steps in flight at most
        # Token-level pipelining: with steps in flight on several stages, a long prompt goes in chunks.
        chunks = partial(prompt_chunks, cfg, pipeline or PipelineSpec(), self.depth) if self.depth > 1 else None
        self.scheduler = Scheduler(self.ecfg.scheduler, self.blocks, chunks)
        self.capacity_tokens = num_blocks * bs * cp
        log.info("KV cache: %d blocks x %d tokens x cp %d = %d tokens (%.1f MiB per rank)", num_blocks, bs, cp,
                 self.capacity_tokens, num_blocks * per_block / 2**20)
        self.eos = set(cfg.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.live: dict[str, LiveRequest] = {}
        self.inflight: deque[tuple[SchedulerOutput, StepInput]] = deque()  # submitted, oldest first
        self.steps_done = 0  # steps collected
        self.last_decode_tokens: int | None = None  # tokens of the last step collected, None unless a decode step
        self._trace: tuple[str, int] | None = None  # (path, steps_done at which to write it)
        self._ids = itertools.count()
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0
        spec = self.ecfg.speculative
        if (spec is None) != (proposer is None):
            raise ConfigError("Speculative decoding needs both EngineConfig.speculative and a proposer "
                              "(meshlm.LLM(speculative=...) builds them together).")
        self.spec = Speculator(proposer, spec) if proposer is not None else None
        self.ledger = PositionLedger() if positions.enabled() else None  # debug: engine/positions.py

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                    timeout_s: float | None = None, resume: Resume | None = None) -> Request:
        """Queue a request; raises RequestError (never waits) when it can't be served.

        resume: tokens (and their text) already generated elsewhere; they count against max_tokens, are
        recomputed as prompt, and are not reported again (a request moved from a failed replica)."""
        if not prompt:
            raise RequestError("The prompt is empty; pass at least one token.")
        if len(prompt) >= self.max_context:
            raise RequestError(
                f"The prompt has {len(prompt)} tokens but the context window is {self.max_context}; "
                "shorten the prompt (at least one token must remain for generation)."
            )
        bad = next((t for t in prompt if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size}).")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.live:
            raise RequestError(f"request id {rid!r} is already in use.")
        req = Request(rid, list(prompt), params, max_new=min(params.max_tokens, self.max_context - len(prompt)))
        live = LiveRequest(req, self.tokenizer, set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos))
        if resume is not None and resume.token_ids:
            if len(resume.token_ids) >= req.max_new or len(prompt) + len(resume.token_ids) >= self.max_context:
                raise RequestError("The resumed request has no tokens left to generate.")
            req.tokens.extend(resume.token_ids)
            req.out.token_ids.extend(resume.token_ids)
            live.decoder.ids, live.decoder.text = list(resume.token_ids), resume.text
            req.out.text = resume.text
        if timeout_s is not None:
            req.deadline = req.arrival + timeout_s
        self.scheduler.add(req)
        self.total_prompt_tokens += len(prompt)
        self.live[rid] = live
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False when it is unknown or already finished."""
        live = self.live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.finish(live.req, "abort")
        self._release(request_id)
        return True

    def _release(self, request_id: str) -> None:
        if self.spec is not None:
            self.spec.release(request_id)

    def has_unfinished(self) -> bool:
        """True while requests wait or run, or a step is in flight."""
        return self.scheduler.has_work() or bool(self.inflight)

    def stats(self) -> EngineStats:
        """The figures a server reports and admits by (cheap: read after every step)."""
        s = self.scheduler
        c = self.spec.counters if self.spec is not None else None
        spec = None if c is None else SpecCounters(c.drafts, c.proposed, c.accepted, list(c.proposed_at),
                                                   list(c.accepted_at))
        return EngineStats(len(s.running), len(s.waiting), s.cfg.max_waiting, self.blocks.usage(), s.num_preemptions,
                           self.total_prompt_tokens, self.total_generated_tokens,
                           self.executor.collective_seconds(), self.executor.bubble_fraction(), spec,
                           self.executor.experts_dropped(), self.executor.cp_ring_choices(),
                           self.executor.expert_figures())

    def failure(self) -> RankFailure | None:
        """Why the ranks are gone, or None while every rank lives (a step then raises this failure)."""
        return self.executor.failure

    def progress(self) -> int:
        """A count the running step advances (rank 0's decoder layers), readable from any thread."""
        return self.executor.progress()

    def ping(self) -> None:
        """Make one cheap call on every rank while idle; raises RankFailure when a rank is gone."""
        self.executor.ping()

    def step(self) -> list[RequestOutput]:
        """Fill the pipeline with steps (one per stage), then finish the oldest; return the outputs that changed.

        With one stage this is one step: plan, run on every rank, sample.
        """
        changed: list[RequestOutput] = []
        while len(self.inflight) < self.depth:
            if self.spec is not None:
                self.spec.propose(self.scheduler, self.depth)
            plan = self.scheduler.schedule(self.depth)
            for r in plan.timed_out:
                changed.append(r.out)
                self.live.pop(r.id, None)
                self._release(r.id)
            for r in plan.preempted:
                self._release(r.id)
                if self.ledger is not None:
                    self.ledger.preempted.add(r.id)
            if not plan.items:
                break
            self._submit(plan)
        if not self.inflight:
            self.executor.pause()
            return changed
        changed += self._finish_oldest()
        if self._trace is not None and self.steps_done >= self._trace[1]:
            changed += self._write_trace()
        if not self.inflight and not self.scheduler.has_work():
            self.executor.pause()  # idle ranks wait in the control loop
            if self.ledger is not None:
                self.check_positions()
        return changed

    def check_positions(self) -> int:
        """Debug: every rank ran every step at the positions the driver planned, and each request's next step
        starts where the previous one's accepted tokens end (so all stages agree on every accepted count).
        Needs nothing in flight; returns the steps checked, raises AssertionError naming the first disagreement."""
        assert self.ledger is not None and not self.inflight, "needs MESHLM_CHECK_POSITIONS=1 and nothing in flight"
        return self.ledger.check(self.executor.call_all("take_position_ledger"))

    def record_trace(self, path: str, steps: int) -> None:
        """pp > 1: record every rank's timeline over the next `steps` steps, then write it to path (Chrome trace)."""
        if self.executor.depth == 1:
            raise ConfigError("A trace shows the pipeline's stages; it needs --pp 2 or more.")
        if steps < 1:
            raise ConfigError(f"--trace-steps must be >= 1, got {steps}.")
        self.drain()
        self.executor.call_all("start_timeline", True)
        self._trace = (path, self.steps_done + steps)

    def _write_trace(self) -> list[RequestOutput]:
        changed = self.drain()  # the ranks answer calls only with nothing in flight
        path, _ = self._trace
        self._trace = None
        write_chrome_trace(path, self.executor.call_all("stage_report"))
        self.executor.call_all("start_timeline", False)  # back to totals only
        log.info("pipeline trace written to %s", path)
        return changed

    def drain(self) -> list[RequestOutput]:
        """Finish every step in flight without starting another, and return the ranks to the control loop."""
        if self.executor.broken:  # a rank failed: its error is already on its way to the caller
            self.inflight.clear()
            return []
        changed: list[RequestOutput] = []
        while self.inflight:
            changed += self._finish_oldest()
        self.executor.pause()
        return changed

    def _finish_oldest(self) -> list[RequestOutput]:
        changed: list[RequestOutput] = []
        plan, step = self.inflight.popleft()
        out = self.executor.collect()
        full = dict(zip(step.full_rows, out.logits))
        now = time.perf_counter()
        row = 0
        self.steps_done += 1
        decode = _all_decode(plan)
        self.last_decode_tokens = len(step.token_ids) if decode else None
        for item in plan.items:
            req = item.req
            live = req.status is not Status.FINISHED  # not aborted or timed out while in flight
            if live and not item.draft:
                self.scheduler.computed(item)
            if not item.samples:
                continue
            rows = range(row, row + 1 + len(item.draft))  # the target's rows after tokens[-1] and each proposal
            row = rows.stop
            if not live:
                continue
            logits = torch.stack([full[i] for i in rows]) if rows.start in full else None  # [k+1, V]
            q = self.spec.q(item) if item.draft else None
            emitted = verify(req.params, item.draft, q, out.best[rows.start:rows.stop], logits, len(req.tokens))
            if item.draft:
                self.spec.record(item, len(emitted) - 1)
            for i, token in enumerate(emitted):
                self._accept(req, token, None if logits is None else logits[i], now)
                if req.status is Status.FINISHED:  # a stop or max_tokens: nothing past it is emitted
                    break
            else:
                if item.draft:
                    self.scheduler.computed(item, len(emitted) - 1)
            changed.append(req.out)
        if self.ledger is not None:
            self.ledger.collected(plan)
        if self.spec is not None:  # the cost fit's sample: this step and those in flight, if all decode
            decode = decode and all(_all_decode(p) for p, _ in self.inflight)
            self.spec.step_done([len(s.token_ids) for _, s in [(plan, step), *self.inflight]] if decode else None,
                                busy=bool(self.inflight) or self.scheduler.has_work())
        return changed

    def _submit(self, plan: SchedulerOutput) -> None:
        tokens: list[int] = []
        seqs, samples, full = [], [], []
        for item in plan.items:
            seqs.append(SeqInput(len(tokens), item.start, item.num_tokens, tuple(item.req.block_table)))
            tokens.extend(item.req.tokens[item.start:item.start + item.num_new])
            tokens.extend(item.draft)
            if item.samples:  # a row after the last known token and after each proposal
                for offset in range(len(tokens) - 1 - len(item.draft), len(tokens)):
                    if not item.req.params.greedy or item.req.params.logprobs is not None:
                        full.append(len(samples))  # the sampler or the logprobs need the whole row
                    samples.append(offset)
        ids = tuple(item.req.id for item in plan.items) if self.ledger is not None else ()
        step = StepInput(tuple(tokens), tuple(seqs), tuple(samples), tuple(full), ids)
        if self.ledger is not None:
            self.ledger.submitted(step)
        self.executor.submit(step)
        self.inflight.append((plan, step))

    def _accept(self, req: Request, token: int, logits: torch.Tensor | None, now: float) -> None:
        """Emit one verified token: logits [V] its raw row (for logprobs); may finish the request."""
        self.total_generated_tokens += 1
        reason = emit(self.live[req.id], token, logits, now)
        if reason is not None:
            self.scheduler.finish(req, reason)
            self.live.pop(req.id, None)
            self._release(req.id)

    def generate(self, prompts: Iterable[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Run a batch to completion; outputs in input order."""
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [r.out for r in reqs]
