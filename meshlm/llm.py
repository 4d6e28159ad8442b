"""The offline Python API: meshlm.LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from meshlm.checkpoint import open_checkpoint
from meshlm.checkpoint.quantized import check_quantize, precision
from meshlm.config import SamplingParams
from meshlm.engine.engine import EngineConfig, LLMEngine
from meshlm.engine.executor import Executor
from meshlm.engine.request import RequestOutput
from meshlm.engine.speculative import SpeculativeConfig, check_proposer, make_proposer
from meshlm.engine.worker import DTYPES, WorkerSpec
from meshlm.errors import ConfigError, RequestError
from meshlm.parallel.comm import resolve_transport
from meshlm.parallel.device import resolve_device
from meshlm.parallel.mesh import ParallelDims
from meshlm.parallel.pipeline import PipelineSpec, plan_stages

log = logging.getLogger(__name__)


class LLM:
    """Load a model once (on one process, or split over tp ranks) and generate from it.

    The ranks live until close(), the end of a `with` block, the last reference going away, or interpreter
    exit, whichever comes first. device: "auto" (CUDA when present), "cpu" or "cuda" (rank r on cuda:r).
    dtype: "auto" (a GGUF's Q8_0/Q4_0/Q4_1 weights run as stored, other quantized types convert to those,
    everything else float32), or "float32" / "bfloat16" / "float16" (every weight dequantized to it).
    quantize: "int8" / "int4" / "int4-min" quantizes a float model's linear and embedding weights at load.
    ep: expert parallelism for MoE models, whole experts on each of the tp ranks (ep=N implies tp=N);
    expert_capacity: with ep > 1, the capacity factor (None: dropless). See docs/expert_parallelism.md.
    speculative: "ngram" | "draft:PATH" | "self-int4" (or a SpeculativeConfig) turns on speculative decoding
    with up to num_speculative_tokens proposals per step (docs/speculative.md); outputs stay exact.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", threads: int | None = None,
                 max_context: int | None = None, tp: int = 1, pp: int = 1, progress: bool = True,
                 comm_timeout_s: float = 60.0, backend: str | None = None, quantize: str | None = None,
                 engine: EngineConfig | None = None, pp_layers: Sequence[int] | None = None,
                 pipeline: PipelineSpec | None = None, transport: str | None = None,
                 device: str | None = None, speculative: str | SpeculativeConfig | None = None,
                 num_speculative_tokens: int = 4, ep: int = 1, expert_capacity: float | None = None) -> None:
        prec = precision(dtype, quantize, DTYPES)  # a bad name fails before any process starts
        if isinstance(speculative, str):
            speculative = SpeculativeConfig(speculative, num_speculative_tokens)
        if speculative is not None:
            engine = replace(engine or EngineConfig(), speculative=speculative)
        dims = ParallelDims(tp=tp, pp=pp, ep=ep)  # ep=N alone implies tp=N (mesh.py)
        choice = resolve_device(device, backend, dims.world_size)
        transport = resolve_transport(transport)  # auto | shm | gloo; a typo fails before any process starts
        pipeline = pipeline or PipelineSpec()
        if pp_layers is not None:
            pipeline = replace(pipeline, layers=tuple(pp_layers))
        # Refuse a layout the model cannot take before any process starts or any weight loads.
        ckpt = open_checkpoint(model)
        check_quantize(ckpt.source, ckpt.path, prec)
        cfg = ckpt.cfg
        dims.check_model(cfg)
        plan_stages(cfg, pp, pipeline)
        if speculative is not None:
            check_proposer(speculative, model)
        spec = WorkerSpec(model=model, dtype=dtype, threads=threads, max_context=max_context, dims=dims,
                          quantize=quantize, progress=progress, pipeline=pipeline,
                          transport=transport, device=choice, expert_capacity=expert_capacity)
        self.executor = Executor(spec, timeout_s=comm_timeout_s)
        # Closes the ranks once: on close(), when this object is collected, or at interpreter exit. It holds
        # the executor, never self, so an LLM that is dropped can be collected.
        self._finalizer = weakref.finalize(self, self.executor.close)
        try:
            w = self.executor.worker
            self.cfg, self.tokenizer, self.path = w.cfg, w.tokenizer, w.path
            self.max_context, self.threads, self.dtype = w.max_context, w.threads, w.dtype
            self.device = w.device
            self.dims = dims
            self.pipeline = pipeline
            proposer = None if speculative is None else make_proposer(
                speculative, target_model=model, vocab_size=self.cfg.vocab_size, threads=self.threads,
                device=choice.kind)
            self.engine = LLMEngine(self.executor, self.cfg, self.tokenizer, self.max_context, engine,
                                    pipeline, proposer)
        except BaseException:
            self._finalizer()
            raise

    @property
    def model(self) -> torch.nn.Module:
        """Rank 0's model (the whole model when tp == 1)."""
        return self.executor.worker.model

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
        # Every rank samples on its own from identical logits: unseeded requests get a seed here.
        plist = [p if p.greedy or p.seed is not None else replace(p, seed=random.getrandbits(63))
                 for p in plist]
        return ids, plist

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 chat: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a batch; returns one RequestOutput per prompt, in order."""
        ids, plist = self._prepare(prompts, sampling_params, chat)
        return self.engine.generate(ids, plist)

    def stream(self, prompt, sampling_params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[tuple[str, RequestOutput]]:
        """Yield (text delta, output so far) for a single prompt."""
        ids, plist = self._prepare([prompt], sampling_params, chat)
        req = self.engine.add_request(ids[0], plist[0])
        shown = 0
        try:
            while not req.out.finished:
                self.engine.step()
                yield req.out.text[shown:], req.out
                shown = len(req.out.text)
        finally:
            if not req.out.finished:
                self.engine.abort(req.id)
                self.engine.drain()  # pp > 1: a step may still be in flight

    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Full-sequence logits [B, S, V] (fp32) for right-padded prompts (no cache), for checks."""
        if self.dims.pp > 1:
            raise ConfigError("logits() needs the whole model on one stage; use pp=1 (tp is fine).")
        return self.executor.call("logits", token_ids)

    def rank_info(self) -> list[dict]:
        """Per-rank facts: heads owned, weight MB, peak RSS MB, load seconds."""
        return self.executor.call_all("describe")

    def comm_stats(self) -> list[dict]:
        """Per-rank collective totals."""
        return self.executor.call_all("comm_stats")

    def expert_stats(self) -> list[dict]:
        """Per-rank experts held and tokens routed (before dispatch) / dropped per MoE layer (ep > 1)."""
        return self.executor.call_all("expert_stats")

    def start_timeline(self, spans: bool = True) -> None:
        """pp > 1: restart every rank's pipeline timeline together; spans=True records a trace, else totals only."""
        self._need_pipeline("start_timeline")
        self.executor.call_all("start_timeline", spans)

    def stage_reports(self) -> list[dict]:
        """pp > 1, per rank: stage, layers, memory and the pipeline timeline since start_timeline()."""
        self._need_pipeline("stage_reports")
        return self.executor.call_all("stage_report")

    def write_trace(self, path: str) -> None:
        """Write every rank's timeline since start_timeline() as Chrome trace JSON (opens in Perfetto)."""
        from meshlm.telemetry.trace import write_chrome_trace

        write_chrome_trace(path, self.stage_reports())

    def _need_pipeline(self, what: str) -> None:
        if self.dims.pp == 1:
            raise ConfigError(f"{what}() describes pipeline stages; build the LLM with pp=2 or more.")

    def reset_comm_stats(self) -> None:
        """Zero every rank's collective totals."""
        self.executor.call_all("reset_stats")

    @property
    def closed(self) -> bool:
        """True once close() (or garbage collection) has ended the ranks."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the ranks, free the process group and the model (idempotent); the LLM is unusable after."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
