"""meshlm's own software overhead per decoder layer and per engine step, timed on small random models.

A model of hidden size 64 does almost no arithmetic, so its decode step is what the framework costs:
module calls, operator dispatch, paged-attention bookkeeping, scheduling and sampling. Two depths give
a line: step(L) = step_overhead + L x layer_overhead; the per-layer figure is never taken below one
layer's forward timed directly (layer_floor: the same operators without the engine), so a noisy pair of
steps cannot make it 0. Those operators run slower when the weights a
real step streams have evicted their data from the caches, so the per-layer figure is then taken from a
model whose weights outgrow the caches (hidden 512, 24 layers, ~290 MB in fp32: a shape of neither
benchmark model): layer_overhead = (step - step_overhead - weight bytes / bandwidth) / layers.
Each figure is the median of three rounds.
Used by `meshlm plan --calibrate`; on the small models a CPU host runs it is a tenth of a step.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

from meshlm.plan.host import Then, as_calibrated

log = logging.getLogger(__name__)

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": False}


COLD = {**TINY, "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 1024}


def tiny_checkpoint(folder: Path, layers: int, shape: dict | None = None) -> Path:
    """Write a random Llama of `layers` layers (config.json, model.safetensors, a word-level tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from meshlm.checkpoint.loader import build_meta
    from meshlm.checkpoint.names import hf_names
    from meshlm.config import ModelConfig

    folder.mkdir(parents=True, exist_ok=True)
    raw = {**(shape or TINY), "num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(raw))
    g = torch.Generator().manual_seed(layers)
    weights = {hf_names(n)[0]: 0.1 * torch.randn(p.shape, generator=g)
               for n, p in build_meta(ModelConfig.from_hf(raw)).named_parameters()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}.": i for i in range(3, raw["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False}))
    return folder


def decode_step_seconds(path: Path, threads: int, new: int, runs: int) -> float:
    """Median seconds of one decode step of the model at `path` (tp=1), from (new-token run - 1-token run)."""
    from meshlm import LLM, SamplingParams
    from meshlm.engine.engine import EngineConfig

    rng = random.Random(0)
    ids = lambda: [rng.randrange(3, TINY["vocab_size"]) for _ in range(16)]
    steps = []
    with LLM(str(path), threads=threads, progress=False, engine=EngineConfig(kv_cache_mb=16)) as llm:
        llm.generate([ids()], SamplingParams(max_tokens=new, ignore_eos=True))  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            llm.generate([ids()], SamplingParams(max_tokens=1, ignore_eos=True))
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            llm.generate([ids()], SamplingParams(max_tokens=new, ignore_eos=True))
            steps.append((time.perf_counter() - t0 - a) / (new - 1))
    return statistics.median(steps)


def layer_floor(threads: int = 1, keys: int = 16, seconds: float = 0.2) -> float:
    """Median seconds of one TINY decoder layer's forward called directly on one token over `keys` cached
    keys (no engine, no paging): the least a layer costs, a floor for the engine's noisier residual."""
    import torch

    from meshlm.config import ModelConfig
    from meshlm.models.layers import rope_cos_sin, rope_inv_freq, sdpa
    from meshlm.models.llama import Block

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_hf({**TINY, "num_hidden_layers": 1})
    block = Block(cfg, 0).eval()
    kv = torch.randn(2, 1, cfg.num_kv_heads, keys, cfg.head_dim)  # [2, B, Hkv, T, D]
    attn = lambda _, q, k, v: sdpa(q.transpose(1, 2), kv[0], kv[1], None).transpose(1, 2)
    x = torch.randn(1, 1, cfg.hidden_size)  # [B, S, H]
    cos, sin = rope_cos_sin(rope_inv_freq(cfg.rope, cfg.head_dim), torch.tensor([[keys]]), x.dtype)
    times: list[float] = []
    with torch.inference_mode():
        block(x, cos, sin, attn)
        deadline = time.perf_counter() + seconds
        while len(times) < 20 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            block(x, cos, sin, attn)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def software_overhead(threads: int = 1, quick: bool = False, bandwidth: float | None = None,
                      rounds: int = 3, then: Then | None = None) -> tuple[float, float]:
    """(seconds per layer per forward, seconds per engine step) of meshlm on this host: the median of
    `rounds` rounds, each timing every model in a freshly loaded engine (1 round with `quick`). `then`
    (host.beside_run bound to the calibration's probe) times the cold model between two readings of the
    host, whose streaming then counts at `bandwidth` x the state they read."""
    from meshlm.config import ModelConfig

    depths = (2, 10)
    new, runs = (16, 3) if quick else (64, 3)
    floor = layer_floor(threads)
    cfg = ModelConfig.from_hf({**COLD, "num_hidden_layers": 24})
    streamed = (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) * 4  # all but the embedding rows
    layer, step = [], []
    with tempfile.TemporaryDirectory(prefix="meshlm-overhead-") as tmp:
        paths = [tiny_checkpoint(Path(tmp) / f"l{n}", n) for n in depths]
        cold_path = None if quick or bandwidth is None else tiny_checkpoint(Path(tmp) / "cold", 24, COLD)
        for _ in range(1 if quick else rounds):
            t = [decode_step_seconds(p, threads, new, runs) for p in paths]
            # a difference of two noisy steps: never below what the layer's own operators cost
            per_layer = max(floor, (t[1] - t[0]) / (depths[1] - depths[0]))
            per_step = max(0.0, t[0] - depths[0] * per_layer)
            if cold_path is not None:
                cold, now = (then or as_calibrated)(lambda: decode_step_seconds(cold_path, threads, 32, 3))
                per_layer = max(per_layer, (cold - per_step - streamed / (bandwidth * now.bandwidth)) / 24)
            layer.append(per_layer)
            step.append(per_step)
            log.info("overhead round %d: %.0f us per layer (floor %.0f), %.0f us per step", len(layer),
                     per_layer * 1e6, floor * 1e6, per_step * 1e6)
    # The median, not the minimum: the per-layer figure is a residual (a step less its streaming time at
    # the calibrated bandwidth), so noise moves it either way, and what the planner predicts is the
    # median step the benchmark (and a server) measures, not the best one. Rounds reload the models, so
    # the median also spans how the weights happened to land in memory.
    return statistics.median(layer), statistics.median(step)
