"""One worker per rank: build on meta -> apply the sharding plan -> load owned slices -> run."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import torch

from meshlm.checkpoint import open_checkpoint
from meshlm.checkpoint.loader import build_meta, load_weights
from meshlm.checkpoint.names import hf_names
from meshlm.checkpoint.quantized import Conversions, check_quantize, describe_bytes, file_precision, precision
from meshlm.engine.engine import host_kv_budget_bytes
from meshlm.engine.expert_buffer import make_buffered
from meshlm.engine.model_runner import ModelRunner, StepOutput, kv_bytes_per_block
from meshlm.engine.paged_attention import StepInput
from meshlm.engine.pipeline_stage import StageDriver
from meshlm.errors import ConfigError
from meshlm.kernels import pack_linears
from meshlm.models.registry import sharding_plan
from meshlm.parallel.comm import STATS, Groups
from meshlm.parallel.context import RING_CHOICES
from meshlm.parallel.device import DeviceChoice, rank_device
from meshlm.parallel.eplb import Balancer, BalancerSpec, ExpertFigures
from meshlm.parallel.expert import ExpertLoad, ExpertParallelExperts
from meshlm.parallel.mesh import ParallelDims
from meshlm.parallel.pipeline import PipelineSpec, plan_stages, split_model
from meshlm.parallel.styles import ShardLayout, apply_plan
from meshlm.threads import keep_freed_memory, set_threads

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs to build its part of the model (sent to spawned ranks)."""

    model: str | None = None
    dtype: str = "auto"  # auto: a GGUF's quantized tensors stay quantized, the rest float32; else all float
    quantize: str | None = None  # int8 | int4 | int4-min: quantize float linear/embedding weights at load
    threads: int | None = None
    max_context: int | None = None
    dims: ParallelDims = field(default_factory=ParallelDims)
    progress: bool = False
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)  # stage split and prompt chunks when pp > 1
    transport: str | None = None  # collectives: auto | shm | gloo (None: $MESHLM_TRANSPORT, else auto)
    device: DeviceChoice = field(default_factory=DeviceChoice)  # cpu (gloo) or cuda:<local rank> (nccl)
    expert_capacity: float | None = None  # ep > 1: rows per expert <= ceil(factor x routed / experts); None: dropless
    cp_ring: str = "auto"  # context parallelism's prefill ring: auto | pass-kv | pass-q
    balancer: BalancerSpec = field(default_factory=BalancerSpec)  # ep > 1: redundant experts, rebalancing
    expert_budget: int | None = None  # bytes of resident experts (the rest read on demand); None: all resident

    def __post_init__(self) -> None:
        self.dims.check_runnable()  # a layout the engine cannot run fails before any rank starts
        if self.expert_capacity is not None and (self.dims.ep == 1 or not self.expert_capacity > 0):
            raise ConfigError(f"--expert-capacity {self.expert_capacity} needs --ep > 1 and a factor > 0 (1.0: "
                              "each expert takes its even share of the routed tokens); omit it to drop nothing.")
        if self.cp_ring not in RING_CHOICES:
            raise ConfigError(f"--cp-ring {self.cp_ring!r} is unknown; use one of {', '.join(RING_CHOICES)}.")
        if self.expert_budget is not None and self.dims.tp > 1:
            raise ConfigError(f"--expert-budget {self.expert_budget} buffers whole experts on one rank per stage: it "
                              "needs --tp 1 and --ep 1 (drop --tp/--ep, or drop --expert-budget).")
        b = self.balancer
        if (b.interval or b.redundant or b.slots) and self.dims.ep == 1:
            raise ConfigError("--eplb-interval, --redundant-experts and --expert-slots place whole experts: they need "
                              "--ep > 1.")


def memory_mb() -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS) and RssAnon (private memory) of this process, in MB (Linux)."""
    out = {"VmRSS": 0.0, "VmHWM": 0.0, "RssAnon": 0.0}
    try:
        for line in open("/proc/self/status"):
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    except OSError:
        pass
    return out


class Worker:
    """Holds this rank's shard of the model and runs the same generation loop as every other rank."""

    def __init__(self, spec: WorkerSpec, groups: Groups, rank: int = 0) -> None:
        self.spec, self.groups, self.rank = spec, groups, rank
        self.device = rank_device(spec.device.kind, rank)
        self.ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or spec.dims.world_size)  # torchrun sets it
        self.threads = set_threads(spec.threads, self.ranks_here)
        self.anon_before_mb = memory_mb()["RssAnon"]
        t0 = time.perf_counter()
        ckpt = open_checkpoint(spec.model)
        self.cfg, self.tokenizer, self.path = ckpt.cfg, ckpt.tokenizer, ckpt.path
        self.precision = file_precision(precision(spec.dtype, spec.quantize, DTYPES), ckpt.source)
        self.dtype = self.precision.dtype
        check_quantize(ckpt.source, self.path, self.precision)
        spec.dims.check_model(self.cfg)
        model = build_meta(self.cfg)
        self.stage = plan_stages(self.cfg, spec.dims.pp, spec.pipeline)[groups.pp.index]
        split_model(model, self.stage)  # a pipeline stage keeps (and loads) only its own modules
        # ep > 1: tokens routed to each expert (counted before dispatch), dropped, and the balancer's window
        self.expert_load = ExpertLoad(window=spec.balancer.window)
        part_for = apply_plan(model, sharding_plan(self.cfg), self.cfg, groups.tp, spec.dims.ep, spec.expert_capacity,
                              self.expert_load)
        self.source = ckpt.source  # memory-mapped: a rebalance or a buffer miss reads experts from it alone
        # --expert-budget: experts leave the parameters (not loaded here) for a cache filled on demand
        self.expert_cache = make_buffered(model, self.cfg, spec.expert_budget, self.dtype, self._read_expert) \
            if spec.expert_budget is not None else None
        conversions = Conversions()
        self.model = load_weights(model, self.cfg, ckpt.source, self.precision, part_for=part_for,
                                  progress=spec.progress and rank == 0, device=self.device, conversions=conversions)
        self.balancer = Balancer(spec.balancer, self.model, self.expert_load)  # no MoE layers at ep = 1: a no-op
        pack_linears(self.model)  # on a CPU with the kernel: every float Linear weight in its packed layout
        self.conversion_error = conversions.report()  # {"Q6_K->Q8_0": relative RMS error} of this rank's share
        if self.conversion_error and rank == 0:
            log.warning("%s: converted at load to kept formats, relative RMS error against the file's own "
                        "values: %s", self.path.name, ", ".join(f"{k} {v:.2%}" for k, v in
                                                                self.conversion_error.items()))
        self.max_context = min(spec.max_context or self.cfg.max_position, self.cfg.max_position)
        self.load_s = time.perf_counter() - t0
        keep_freed_memory()  # after loading: the load's temporaries go back to the OS as usual
        self.layers_done = 0  # decoder layers this rank has run: a progress count finer than a step
        for layer in getattr(self.model, "layers", {}).values():
            layer.register_forward_hook(self._layer_done)
        self.layout = ShardLayout.for_model(self.cfg, groups.tp.index, groups.tp.size)
        self.format_bytes = describe_bytes(self.model)  # {"Q4_1": bytes, "float32": bytes}: packed as stored
        self.weight_bytes = sum(self.format_bytes.values())
        log.info("rank %d: loaded %s (%.1f MB of weights, heads %s) in %.2fs", rank, self.path,
                 self.weight_bytes / 1e6, self.layout.mine, self.load_s)

    def _layer_done(self, *_: object) -> None:
        self.layers_done += 1

    def layers_run(self) -> int:
        """Decoder layers this rank has run, module by module or inside the whole-stack decode op."""
        cache = getattr(getattr(self, "runner", None), "cache", None)
        return self.layers_done + getattr(cache, "stack_layers_run", 0)

    def describe(self) -> dict:
        """Facts about this rank: heads owned, weight MB, peak RSS MB, private memory the load added."""
        mem = memory_mb()
        return {"rank": self.rank, "q_heads": self.layout.mine.num_q,
                "kv_heads": self.layout.mine.kv_end - self.layout.mine.kv_start,
                "weight_mb": self.weight_bytes / 1e6, "peak_rss_mb": mem["VmHWM"],
                "weight_mb_by_format": {k: v / 1e6 for k, v in self.format_bytes.items()},
                "conversion_error": self.conversion_error,
                "anon_added_mb": mem["RssAnon"] - self.anon_before_mb,
                "load_s": self.load_s, "threads": self.threads, "transport": self.groups.tp.transport,
                "device": str(self.device),
                "stage": self.stage.index,
                "layers": (self.stage.start, self.stage.stop)}

    @torch.inference_mode()
    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Full-sequence logits [B, S, V] (fp32) of right-padded prompts, without a cache."""
        from meshlm.models.layers import CausalNoCache

        lens = [len(t) for t in token_ids]
        b, s = len(token_ids), max(lens)
        tokens = torch.zeros(b, s, dtype=torch.long)
        mask = torch.zeros(b, s, dtype=torch.bool)
        for i, t in enumerate(token_ids):
            tokens[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = True
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        positions = torch.arange(s, device=self.device).expand(b, s)
        return self.model(tokens, positions, CausalNoCache(mask, self.cfg.sliding_window)).float().cpu()

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes of one KV block on this rank."""
        return kv_bytes_per_block(self.model, self.cfg, block_size, self.dtype)

    def kv_budget_bytes(self, fraction: float) -> int:
        """fraction of this rank's free memory: its GPU's, or its share of the host's among the ranks here."""
        if self.device.type == "cuda":
            return int(fraction * torch.cuda.mem_get_info(self.device)[0])
        return host_kv_budget_bytes(fraction, self.ranks_here)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """Allocate the paged KV pool (this stage's layers) on this rank's device; pages are touched as written."""
        self.runner = ModelRunner(self.model, self.cfg, self.dtype, self.device, self.groups.cp, self.spec.cp_ring)
        self.runner.allocate(num_blocks, block_size, announce=self.rank == 0)
        self.kv_pool_bytes = num_blocks * self.kv_block_bytes(block_size)
        self.stages = StageDriver(self.runner, self.groups, self.stage, self.cfg.hidden_size, self.dtype,
                                  self._after_step) if self.spec.dims.pp > 1 else None

    def execute(self, step: StepInput) -> StepOutput:
        """One engine step on this rank (pp == 1): the sampled rows' argmax and the logits asked for."""
        out = self.runner.execute(step)
        self._after_step()
        return out

    def _after_step(self) -> None:
        """After this stage ran an engine step: every --eplb-interval steps, rebalance this stage's MoE layers.

        Every rank of a stage runs the same steps in the same order (pp > 1: in submission order, one at a time),
        so its ep group agrees on step n without a message, and between two of its steps no row is in flight for
        its layers; other stages' layers are theirs alone. Placement never changes the outputs (dropless)."""
        if self.balancer.layers:
            self.balancer.after_step(self._fetch_experts)

    def rebalance_experts(self) -> dict:
        """Rebalance this stage's MoE layers now, from the load window (see parallel/eplb.py)."""
        return {"rank": self.rank, **self.balancer.rebalance(self._fetch_experts)}

    def expert_figures(self) -> ExpertFigures | None:
        """Balance, per-expert load and per-link bytes of this stage's MoE layers, and the expert buffer's hits,
        misses and fetch time (None with neither)."""
        figures = self.balancer.figures() if self.balancer.layers else None
        if self.expert_cache is None:
            return figures
        c = self.expert_cache
        return replace(figures or ExpertFigures({}, {}, {}), buffer_hits=c.hits, buffer_misses=c.misses,
                       buffer_fetch_seconds=c.fetch_seconds)

    def _read_expert(self, name: str, expert: int) -> tuple[torch.Tensor, ...]:
        """(w1, w3, w2) of one expert from the checkpoint (an expert buffer miss)."""
        got = self._fetch_experts(name, [expert])
        return got["w1"][0], got["w3"][0], got["w2"][0]

    def _fetch_experts(self, name: str, ids: list[int]) -> dict[str, torch.Tensor]:
        """Experts `ids` of module `name` read from the checkpoint alone, in the compute dtype, on the device."""
        return {w: torch.stack([self.source.read(n) for n in hf_names(f"{name}.{w}", self.cfg.architecture, ids)])
                .to(self.device, self.dtype) for w in ("w1", "w3", "w2")}

    def serve_pipeline(self) -> None:
        """pp > 1, every rank but 0: run pipelined engine steps until rank 0 ends them (see pipeline_stage)."""
        self.stages.serve()

    def start_timeline(self, spans: bool) -> None:
        """Restart the pipeline timeline on every rank together; spans=True records a trace."""
        self.stages.start_timeline(spans)

    def stage_report(self) -> dict:
        """This rank's stage, layers, memory and pipeline timeline (see telemetry/trace.py)."""
        return {"rank": self.rank, "stage": self.stage.index, "tp_index": self.groups.tp.index,
                "layers": (self.stage.start, self.stage.stop), "weight_mb": self.weight_bytes / 1e6,
                "kv_mb": self.kv_pool_bytes / 1e6, "peak_rss_mb": memory_mb()["VmHWM"],
                "timeline": self.stages.timeline.to_dict(),
                **({"cp_index": self.groups.cp.index} if self.spec.dims.cp > 1 else {})}

    def take_position_ledger(self) -> list:
        """Debug: (request id, first position, tokens) of every sequence of every step this rank ran since
        the last call; starts a new ledger."""
        ledger, self.runner.ledger = self.runner.ledger, []
        return ledger
    def set_cp_ring(self, ring: str) -> None:
        """Choose the prefill ring from now on (auto | pass-kv | pass-q); every rank of the cp group together."""
        if ring not in RING_CHOICES:
            raise ConfigError(f"cp ring {ring!r} is unknown; use one of {', '.join(RING_CHOICES)}.")
        if hasattr(self.runner.cache, "ring"):
            self.runner.cache.ring = ring

    def cp_ring_choices(self) -> dict[str, int]:
        """Prefill ring choices of this rank so far ({} at cp == 1)."""
        runner = getattr(self, "runner", None)
        return dict(getattr(runner.cache, "choices", {})) if runner is not None else {}

    def comm_stats(self) -> dict:
        """This rank's collective totals."""
        return STATS.snapshot()

    def reset_stats(self) -> None:
        """Zero the collective and expert-load totals."""
        STATS.reset()
        self.expert_load.reset()

    def expert_stats(self) -> dict:
        """This rank's experts (per MoE layer's placement), the group's routed / dropped rows (expert.py), and the
        all-to-all bytes this rank sent each other rank ("links": {"tp/0->1": bytes})."""
        held = {name.split(".")[1]: list(m.placement.slots[m.comm.index]) for name, m in self.model.named_modules()
                if isinstance(m, ExpertParallelExperts)}
        buffer = self.expert_cache.snapshot() if self.expert_cache is not None else None
        return {"rank": self.rank, "experts": held, **self.expert_load.snapshot(), "links": STATS.link_snapshot(),
                "buffer": buffer}
