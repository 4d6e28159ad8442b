"""ParallelDims without ranks: degrees that are not built are refused, the rank layout, the model checks."""

from __future__ import annotations

import pytest

from meshlm.config import ModelConfig
from meshlm.engine.worker import WorkerSpec
from meshlm.errors import ConfigError
from meshlm.parallel.mesh import ParallelDims

SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_ep_spans_the_tp_ranks():
    """--ep N alone implies tp = N and adds no ranks; another tp is refused naming the fix."""
    dims = ParallelDims(ep=4)
    assert (dims.tp, dims.ep, dims.world_size) == (4, 4, 4)
    assert ParallelDims(tp=2, ep=2, pp=2).world_size == 4
    with pytest.raises(ConfigError, match=r"ep=2 with tp=4: .* ep must equal tp\. Use --ep 2 alone \(it implies "
                                          r"--tp 2\), or --tp 4 --ep 4, or --ep 1"):
        ParallelDims(tp=4, ep=2)


def test_ep_needs_an_moe_model_with_enough_experts():
    dense = ModelConfig.from_hf(SMALL)
    with pytest.raises(ConfigError, match=r"ep=2 needs a mixture-of-experts model; LlamaForCausalLM is dense\. "
                                          r"Use --tp 2 instead of --ep"):
        ParallelDims(ep=2).check_model(dense)
    moe = ModelConfig.from_hf({**SMALL, "architectures": ["MixtralForCausalLM"], "num_local_experts": 2,
                               "num_experts_per_tok": 1})
    ParallelDims(ep=2).check_model(moe)
    with pytest.raises(ConfigError, match=r"ep=4 exceeds the model's 2 experts.*--ep <= 2"):
        ParallelDims(ep=4).check_model(moe)


def test_dp_is_a_plannable_layout_but_not_a_runnable_one():
    dims = ParallelDims(dp=2, pp=2, tp=2)  # the planner lays out replicas
    assert dims.world_size == 8
    with pytest.raises(ConfigError, match=r"data parallelism \(dp=2\) is not built into the engine yet; use "
                                          r"dp=1 and start one server per replica \(each with --tp 2 --pp 2\)"):
        dims.check_runnable()
    with pytest.raises(ConfigError, match="data parallelism"):
        WorkerSpec(dims=dims)  # what the ranks are started from: refused before any starts
    ParallelDims(pp=2, tp=2).check_runnable()
    assert WorkerSpec(dims=ParallelDims(pp=2, tp=2)).dims.world_size == 4


@pytest.mark.parametrize("kwargs", [{"tp": 0}, {"pp": -1}, {"dp": 1.5}, {"tp": True}, {"ep": "2"}])
def test_degrees_must_be_positive_integers(kwargs):
    with pytest.raises(ConfigError, match="must be a positive integer"):
        ParallelDims(**kwargs)


def test_world_size_must_be_the_product():
    with pytest.raises(ConfigError, match=r"dp x pp x tp x cp = 1 x 2 x 2 x 1 = 4, but the world size is 3"):
        ParallelDims(tp=2, pp=2, world_size=3)
    assert ParallelDims(tp=2, pp=3, world_size=6).world_size == 6


def test_rank_layout_is_tp_fastest_then_pp_then_dp():
    dims = ParallelDims(dp=2, pp=2, tp=2)
    assert [dims.coords(r) for r in range(8)] == [(d, p, t) for d in range(2) for p in range(2) for t in range(2)]
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(8))
    assert dims.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.pp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for groups in (dims.tp_groups(), dims.pp_groups(), dims.dp_groups()):  # each kind partitions the ranks
        assert sorted(r for g in groups for r in g) == list(range(8))


def test_cp_layout_sits_between_pp_and_tp():
    """cp ranks of one stage are tp apart; tp stays adjacent; every kind partitions the ranks; a pipeline group
    joins the same (cp, tp) index of every stage, so a cp rank's hidden states reach the next stage's cp peer."""
    dims = ParallelDims(pp=2, cp=2, tp=2)
    assert dims.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.cp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [dims.cp_index(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert all(dims.rank_of(*dims.coords(r), dims.cp_index(r)) == r for r in range(8))
    assert all(dims.cp_index(g[0]) == dims.cp_index(g[1]) and dims.coords(g[0])[2] == dims.coords(g[1])[2]
               for g in dims.pp_groups())
    dims.check_runnable()
    ParallelDims(cp=2, tp=2).check_runnable()


def test_check_model_refuses_more_ranks_than_heads_or_layers():
    cfg = ModelConfig.from_hf(SMALL)
    ParallelDims(tp=4, pp=3).check_model(cfg)
    ParallelDims(tp=3).check_model(cfg)  # uneven head splits are fine
    with pytest.raises(ConfigError, match="tp=5 exceeds the model's 4 attention heads"):
        ParallelDims(tp=5).check_model(cfg)
    with pytest.raises(ConfigError, match="pp=4 exceeds the model's 3 layers; use pp <= 3"):
        ParallelDims(pp=4).check_model(cfg)
