"""Pipeline pieces without ranks: the stage split, module removal, prompt chunks, timelines, trace JSON."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlm.checkpoint import open_checkpoint
from meshlm.checkpoint.loader import build_meta, load_weights
from meshlm.errors import ConfigError
from meshlm.models.layers import CausalNoCache
from meshlm.parallel.pipeline import (
    PipelineSpec,
    attention_ratio,
    auto_chunks,
    balance,
    chunk_bounds,
    plan_stages,
    prompt_chunks,
    split_model,
    unit_costs,
)
from meshlm.telemetry.trace import Timeline, chrome_trace


def brute_force(costs: list[float], pp: int) -> float:
    """The smallest possible costliest stage, over every contiguous split."""
    embed, layers, head = costs[0], costs[1:-1], costs[-1]
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(layers)), pp - 1):
        bounds = (0, *cuts, len(layers))
        stages = [sum(layers[a:b]) for a, b in zip(bounds, bounds[1:])]
        stages[0] += embed
        stages[-1] += head
        best = min(best, max(stages))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=2, max_size=9), st.integers(0, 30), st.integers(0, 30),
       st.integers(1, 4))
def test_balance_is_contiguous_complete_and_optimal(layers, embed, head, pp):
    """Every stage gets >= 1 layer, sizes cover the model, the costliest stage is as cheap as it can be."""
    pp = min(pp, len(layers))
    costs = [float(embed), *map(float, layers), float(head)]
    sizes = balance(costs, pp)
    assert len(sizes) == pp and sum(sizes) == len(layers) and min(sizes) >= 1
    bounds = [0, *itertools.accumulate(sizes)]
    stages = [sum(layers[a:b]) for a, b in zip(bounds, bounds[1:])]
    stages[0] += embed
    stages[-1] += head
    assert max(stages) == pytest.approx(brute_force(costs, pp))


def test_split_of_real_configs(checkpoint):
    """Uniform layers split evenly; a head as large as several layers leaves the last stage fewer layers."""
    assert balance([0.0] + [1.0] * 12 + [0.0], 3) == [4, 4, 4]
    smol = open_checkpoint(None).cfg  # 30 layers, a 49152 x 576 tied head
    costs = unit_costs(smol)
    assert costs[-1] > 4 * costs[1], "in decode the head streams ~8 layers' worth of weights"
    sizes = balance(costs, 3)
    assert sum(sizes) == 30 and sizes[-1] < sizes[0]
    assert [(p.start, p.stop) for p in plan_stages(smol, 3)] == [(0, sizes[0]), (sizes[0], 30 - sizes[2]),
                                                                (30 - sizes[2], 30)]
    assert [p.stop - p.start for p in plan_stages(smol, 3, PipelineSpec(layers=(10, 10, 10)))] == [10] * 3


@pytest.mark.parametrize("layers,match", [((10, 10), "3 stages"), ((10, 10, 11), "30 layers"),
                                          ((0, 15, 15), "at least one layer")])
def test_bad_pp_layers_name_the_fix(layers, match):
    """--pp-layers must give one positive count per stage, summing to the model's layers."""
    smol = open_checkpoint(None).cfg
    with pytest.raises(ConfigError, match=match):
        plan_stages(smol, 3, PipelineSpec(layers=layers))


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "mixtral"])
def test_stages_chained_equal_the_whole_model(kind, checkpoint):
    """Split, load each stage alone (a tied head reads the embedding), chain them: bit-identical logits."""
    ckpt = open_checkpoint(str(checkpoint(kind, 4)))
    whole = load_weights(build_meta(ckpt.cfg), ckpt.cfg, ckpt.source, torch.float32)
    plans = plan_stages(ckpt.cfg, 3, PipelineSpec(layers=(1, 2, 1)))
    stages = [load_weights(split_model(build_meta(ckpt.cfg), p), ckpt.cfg, ckpt.source, torch.float32)
              for p in plans]
    assert [sorted(map(int, s.layers.keys())) for s in stages] == [[0], [1, 2], [3]]
    assert stages[0].lm_head is None and stages[1].embed_tokens is None and stages[2].norm is not None
    total = sum(p.numel() for p in whole.parameters())
    assert all(sum(p.numel() for p in s.parameters()) < total for s in stages)
    tokens = torch.randint(3, ckpt.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(11).expand(2, 11)
    with torch.inference_mode():
        x = tokens
        for s in stages:
            x = s(x, positions, CausalNoCache())
        assert torch.equal(x, whole(tokens, positions, CausalNoCache()))


def test_chunks_shrink_along_the_prompt():
    """Equal-cost chunks: later ones (more keys to attend) are shorter; a sliding window caps the effect."""
    chunks = chunk_bounds(2000, 8, ratio=5e-4)
    sizes = [b - a for a, b in chunks]
    assert chunks[0][0] == 0 and chunks[-1][1] == 2000
    assert all(a == b for (_, a), (b, _) in zip(chunks, chunks[1:]))
    assert all(x >= y for x, y in zip(sizes, sizes[1:])) and sizes[0] > 1.3 * sizes[-1]
    cost = [(b - a) + 5e-4 * (b * b - a * a) / 2 for a, b in chunks]
    assert max(cost) - min(cost) <= 2 + 5e-4 * 2000  # equal up to one token
    assert [b - a for a, b in chunk_bounds(2000, 4, ratio=0.0)] == [500] * 4
    windowed = [b - a for a, b in chunk_bounds(2000, 8, ratio=5e-4, window=64)]
    assert max(windowed) - min(windowed) <= 2
    assert chunk_bounds(3, 8, 0.1) == [(0, 1), (1, 2), (2, 3)]
    assert auto_chunks(2000, 2, 1, 128) == 8 and auto_chunks(100, 2, 1, 128) == 1
    assert auto_chunks(2000, 2, 4, 128) == 2
    tail = chunk_bounds(2000, 4, ratio=5e-4, start=512)  # a prefill after a 512-token prefix hit
    assert tail[0][0] == 512 and tail[-1][1] == 2000
    cost = [(b - a) + 5e-4 * (b * b - a * a) / 2 for a, b in tail]
    assert max(cost) - min(cost) <= 2 + 5e-4 * 2000


def test_prompt_chunks_follow_the_rule():
    """The engine's cut of a prefill: auto gives 4 x pp chunks of >= min_chunk tokens; a fixed count; off."""
    smol = open_checkpoint(None).cfg
    ends = prompt_chunks(smol, PipelineSpec(), 2, 0, 2000)
    assert list(ends) == [b for _, b in chunk_bounds(2000, 8, attention_ratio(smol))]
    assert prompt_chunks(smol, PipelineSpec(), 2, 0, 200) == (200,)  # under 2 x min_chunk: one piece
    assert len(prompt_chunks(smol, PipelineSpec(prefill_chunks=5), 2, 0, 200)) == 5
    assert prompt_chunks(smol, PipelineSpec(prefill_chunks=1), 2, 0, 2000) == (2000,)


def test_attention_ratio_of_smollm2():
    """4 * heads * head_dim attention FLOPs per key over 2 x the layer's weights; slower attention costs more."""
    smol = open_checkpoint(None).cfg
    assert attention_ratio(smol) == pytest.approx(4 * 9 * 64 / (2 * (576 * 64 * 2 * 12 + 3 * 576 * 1536)))
    assert attention_ratio(smol, 0.25) == pytest.approx(4 * attention_ratio(smol))
    flops, timed = chunk_bounds(2000, 8, attention_ratio(smol)), chunk_bounds(2000, 8, attention_ratio(smol, 0.25))
    assert timed[-1][1] - timed[-1][0] < flops[-1][1] - flops[-1][0]  # the last chunk shrinks further


def test_bad_attention_speed_names_the_fix():
    """The chunk rule's attention speed must be positive; 1.0 counts FLOPs alone."""
    with pytest.raises(ConfigError, match="attention_speed must be > 0"):
        PipelineSpec(attention_speed=0)


def test_timeline_totals_and_chrome_trace(tmp_path):
    """Spans add up per category; time away from the pipeline is not wall time; one trace row per rank;
    without spans only the totals are kept."""
    tl = Timeline(spans=True)
    tl.record("compute", tl.t0, tl.t0 + 0.3, step=0)
    tl.record("idle", tl.t0 + 0.3, tl.t0 + 0.4)
    tl.record("send", tl.t0 + 0.4, tl.t0 + 0.5)
    tl.away = 0.5
    tl.mark = tl.t0 + 1.0
    t = tl.totals()
    assert t["wall"] == pytest.approx(0.5) and t["compute"] == pytest.approx(0.3)
    assert t["untracked"] == pytest.approx(0.0, abs=1e-9) and t["bubble"] == pytest.approx(0.2)
    reps = [{"rank": r, "stage": r, "tp_index": 0, "layers": (r, r + 1), "timeline": tl.to_dict()}
            for r in range(2)]
    trace = json.loads(json.dumps(chrome_trace(reps)))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == {0, 1} and {e["name"] for e in xs} == {"compute", "idle", "send"}
    assert xs[0]["ts"] == pytest.approx(0.0) and xs[0]["dur"] == pytest.approx(3e5)
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert names == ["rank 0: stage 0, tp 0, layers 0..0", "rank 1: stage 1, tp 0, layers 1..1"]
    quiet = Timeline()
    quiet.resume()
    quiet.record("compute", quiet.mark, quiet.mark + 0.25)
    assert quiet.to_dict()["spans"] == [] and quiet.totals()["compute"] == pytest.approx(0.25)
