"""Expert parallelism over gloo/shm: exact against one device and transformers on Mixtral, Qwen2-MoE and OLMoE;
each rank holds only its experts; the all-to-all bytes follow the tokens routed; the capacity factor drops."""

from __future__ import annotations

import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.parallel.expert import Placement
from meshlm.serve.engine_loop import Snapshot
from meshlm.serve.metrics import ServerMetrics, parse_samples

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NEW_TOKENS = 64
PROMPTS = [[5, 17, 33, 250, 101, 7, 9], [44, 3, 19, 200], [7] * 3 + [300, 301, 302, 303, 304, 99, 12]]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
# ep=4 and ep=2 x pp=2 start 4 ranks each: one of each. Same-host ranks exchange over shared memory; one case
# over gloo (torch.distributed's all_to_all_single with split sizes).
CASES = [("mixtral", 2, 1, "auto"), ("mixtral", 2, 1, "gloo"), ("qwen2_moe", 2, 1, "auto"), ("olmoe", 2, 1, "auto"),
         ("qwen2_moe", 4, 1, "auto"), ("mixtral", 2, 2, "auto")]


@pytest.fixture(scope="module")
def single(llm):
    """ep=1 greedy outputs per kind (the one-device reference)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = [o.token_ids for o in llm(kind).generate(PROMPTS, GREEDY)]
        return cache[kind]

    return get


@pytest.mark.parametrize("kind,ep,pp,transport", CASES)
def test_ep_matches_one_device_and_transformers(kind, ep, pp, transport, checkpoint, single, reference):
    """64 greedy tokens identical to ep=1; logits within tolerance of HF; each rank loads only its experts."""
    with LLM(str(checkpoint(kind)), ep=ep, pp=pp, transport=transport, progress=False) as llm:
        assert llm.dims.tp == ep  # --ep N alone implies tp = N
        assert llm.rank_info()[0]["transport"] == ("gloo" if transport == "gloo" else "shm")
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == single(kind)
        stats, infos = llm.expert_stats(), llm.rank_info()
        if pp == 1:
            logits = llm.logits(PROMPTS)
            ref = reference(kind)
            with torch.no_grad():
                for i, p in enumerate(PROMPTS):
                    expected = ref(torch.tensor([p])).logits[0]
                    torch.testing.assert_close(logits[i, : len(p)], expected, atol=2e-4, rtol=2e-4)
    cfg = llm.cfg
    assert max(i["weight_mb"] for i in infos) * 1e6 < 0.75 * cfg.num_params() * 4  # a share, never the whole
    placement = Placement.contiguous(cfg.num_experts, ep)
    sparse = [str(i) for i in range(cfg.num_layers) if cfg.is_sparse(i)]
    for st in stats:
        index = st["rank"] % ep  # the rank's tp index (pp stages are ep ranks apart)
        assert st["experts"] and set(st["experts"]) <= set(sparse)
        assert all(held == list(placement.slots[index]) for held in st["experts"].values())
        assert not st["dropped"]
    # Routing is counted from the exchanged counts, before any row moves: every rank of a stage holds the
    # group's totals, the same on each; every token was routed K times.
    for stage in range(pp):
        group = stats[stage * ep: (stage + 1) * ep]
        assert all(st["routed"] == group[0]["routed"] for st in group)
        for layer, routed in group[0]["routed"].items():
            assert str(layer) in group[0]["experts"] and sum(routed) % cfg.num_experts_per_tok == 0 and sum(routed)


def test_all_to_all_bytes_follow_routed_tokens(checkpoint):
    """Dispatch + combine bytes = 2 x (rows whose expert sits on another rank) x H x 4, from the counts taken
    where routing decides; the rows each rank receives are the rows routed to its experts."""
    with LLM(str(checkpoint("mixtral")), ep=2, progress=False) as llm:
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm
        llm.reset_comm_stats()
        llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
        comm, experts = llm.comm_stats(), llm.expert_stats()
        cfg = llm.cfg
    placement = Placement.contiguous(cfg.num_experts, 2)
    routed = experts[0]["routed"]  # the group's rows per expert, the same on each rank
    assert all(st["routed"] == routed for st in experts)
    inbound = [sum(routed[layer][e] for layer in routed for e in placement.slots[r]) for r in range(2)]
    assert inbound == [sum(st["sent"][layer][r] for st in experts for layer in routed) for r in range(2)]
    remote = sum(n for st in experts for sent in st["sent"].values() for r, n in enumerate(sent) if r != st["rank"])
    sent = sum(c.get("tp/all_to_all_v", {}).get("bytes", 0) for c in comm)
    assert remote > 0 and sent == 2 * remote * cfg.hidden_size * 4
    assert sum(b for st in experts for b in st["links"].values()) == sent  # per-link counts add up to the op's
    assert set(experts[0]["links"]) == {"tp/0->1"} and set(experts[1]["links"]) == {"tp/1->0"}


def test_capacity_factor_drops_and_counts(checkpoint, single):
    """A generous capacity drops nothing (same tokens as dropless); a tight one drops tokens and counts them."""
    path = str(checkpoint("mixtral"))
    with LLM(path, ep=2, expert_capacity=float(8), progress=False) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == single("mixtral")
        assert all(sum(st["dropped"].values()) == 0 for st in llm.expert_stats())
    with LLM(path, ep=2, expert_capacity=0.5, progress=False) as llm:
        llm.generate(PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))
        stats, engine = llm.expert_stats(), llm.engine.stats()
    assert stats[0]["dropped"] == stats[1]["dropped"]  # the group's count, on every rank
    dropped = sum(stats[0]["dropped"].values())
    routed = sum(sum(r) for r in stats[0]["routed"].values())
    assert 0 < dropped < routed
    # Exported: the engine's stats and the server's /metrics carry the count.
    metrics = parse_samples(ServerMetrics(lambda: Snapshot(engine)).render().decode())
    assert engine.expert_tokens_dropped == dropped == metrics["meshlm_expert_tokens_dropped_total"]


@pytest.mark.parametrize("pp", [1, 2])
def test_rebalance_mid_stream_keeps_outputs_and_exports(pp, checkpoint, single):
    """A manual rebalance between steps of running requests, then one every 5 steps (at pp = 2 each stage
    rebalances its own layers after its step 5, 10, ..): replicas of the hottest experts land on the other rank
    of the stage, each rank within its slots, the max / mean rank load never rises, and the greedy tokens equal
    one device's. Balance, per-expert load and per-link bytes reach /metrics."""
    ep = 2
    with LLM(str(checkpoint("qwen2_moe")), ep=ep, pp=pp, redundant_experts=2, eplb_interval=5,
             progress=False) as llm:
        llm.reset_comm_stats()  # rank 0 lives in this process: earlier LLMs' collective totals
        ids, plist = llm._prepare(PROMPTS, GREEDY, False)
        reqs = [llm.engine.add_request(p, sp) for p, sp in zip(ids, plist)]
        for _ in range(7):
            llm.engine.step()
        llm.engine.drain()  # pp > 1: the steps in flight finish first (the ranks take calls between steps)
        reports = llm.rebalance_experts()
        held = llm.expert_stats()
        while llm.engine.has_unfinished():
            llm.engine.step()
        stats, comm, experts = llm.engine.stats(), llm.comm_stats(), llm.expert_stats()
        every = llm.executor.call_all("expert_figures")
    assert [r.out.token_ids for r in reqs] == single("qwen2_moe")
    assert all(f.rebalances > 1 for f in every)  # the manual one and the periodic ones, on every stage
    layers = set()
    for stage in range(pp):
        group = slice(stage * ep, (stage + 1) * ep)
        rep, hold = reports[group], held[group]
        assert rep[0]["balance"] == rep[1]["balance"]  # each rank decided alone, alike (the group's window)
        bal = rep[0]["balance"]
        assert bal and all(after <= before + 1e-9 for before, after in bal.values())
        assert any(after < before for before, after in bal.values()) and sum(r["moved"] for r in rep) > 0
        for layer in bal:
            ranks = [set(st["experts"][str(layer)]) for st in hold]
            assert all(len(r) <= 8 // 2 + 1 for r in ranks) and ranks[0] | ranks[1] == set(range(8))
        assert any(set(hold[0]["experts"][str(layer)]) & set(hold[1]["experts"][str(layer)]) for layer in bal)
        layers |= set(bal)
    assert layers == {i for i in range(llm.cfg.num_layers) if llm.cfg.is_sparse(i)}  # every stage's MoE layers
    f = stats.experts  # rank 0's: stage 0's group
    assert f.rebalances > 1 and set(f.balance) == {int(k) for k in experts[0]["routed"]}
    assert sum(f.link_bytes.values()) == sum(c["tp/all_to_all_v"]["bytes"] for c in comm[:ep])
    metrics = parse_samples(ServerMetrics(lambda: Snapshot(stats)).render().decode())
    layer = min(f.balance)
    assert metrics[f'meshlm_expert_balance_ratio{{layer="{layer}"}}'] == pytest.approx(f.balance[layer])
    assert metrics['meshlm_expert_link_bytes_total{dst="1",src="0"}'] == f.link_bytes[(0, 1)]
    assert metrics[f'meshlm_expert_load_rows{{expert="0",layer="{layer}"}}'] == f.load[layer][0]
