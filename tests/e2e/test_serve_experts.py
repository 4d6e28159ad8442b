"""`meshlm serve --ep 2` on a random Mixtral: the engine's expert figures reach /metrics through the router."""

from __future__ import annotations

from serve_harness import Server, completion


def test_served_moe_exports_expert_metrics(checkpoint):
    """Dropped rows, per-expert load, balance, link bytes and rebalances of the served engine are on /metrics.

    Reference: with no prefix hits every forwarded token is routed to top_k = 2 experts in every MoE layer, and
    the forwarded tokens are the engine's prompt + generated tokens less each finished request's last token (the
    replica's 1-token readiness probe included); the unlabelled balance is replica 0's own (dp = 1)."""
    srv = Server(checkpoint("mixtral"), "--ep", "2", "--expert-capacity", "0.5", "--eplb-interval", "3",
                 "--kv-cache-mb", "8").wait_healthy(180)
    try:
        with srv.client() as c:
            for i in range(3):  # distinct prompts: no prefix-cache hits
                body = completion(srv.model_name, prompt=f"w{3 + i}. w{9 + i}. w{20 + i}. w7.", max_tokens=5,
                                  ignore_eos=True)
                assert c.post("/v1/completions", json=body).status_code == 200
        m = srv.metrics()
        assert srv.stop() == 0, srv.output()[-3000:]
        assert not srv.leftovers(), "rank processes outlived the server"
    finally:
        srv.stop(5)
    finished = sum(v for k, v in m.items() if k.startswith("meshlm_requests_finished_total{")) + 1  # + the probe
    forwarded = m["meshlm_prompt_tokens_total"] + m["meshlm_generation_tokens_total"] - finished
    layers = sorted({k.split('layer="')[1].split('"')[0] for k in m if k.startswith("meshlm_expert_load_rows{")})
    assert layers == ["0", "1"], sorted(m)
    for layer in layers:
        rows = [m[f'meshlm_expert_load_rows{{expert="{e}",layer="{layer}"}}'] for e in range(4)]
        assert sum(rows) == 2 * forwarded, (rows, forwarded)
        ratio = m[f'meshlm_expert_balance_ratio{{layer="{layer}"}}']
        assert ratio >= 1.0 and ratio == m[f'meshlm_replica_expert_balance_ratio{{layer="{layer}",replica="0"}}']
    assert m["meshlm_expert_tokens_dropped_total"] > 0  # capacity 0.5: half of each expert's even share
    assert m["meshlm_expert_rebalances_total"] > 0
    links = {k: v for k, v in m.items() if k.startswith("meshlm_expert_link_bytes_total{")}
    assert set(links) == {'meshlm_expert_link_bytes_total{dst="1",src="0"}',
                          'meshlm_expert_link_bytes_total{dst="0",src="1"}'} and all(v > 0 for v in links.values())
    for src, dst in ((0, 1), (1, 0)):
        assert m[f'meshlm_replica_expert_link_bytes_total{{dst="{dst}",replica="0",src="{src}"}}'] == \
            links[f'meshlm_expert_link_bytes_total{{dst="{dst}",src="{src}"}}']
