"""Planner: choose a dp x pp x tp layout from model, cluster and workload, explain it, check it.

A pure model (no torch, no engine): cluster.py (devices, links, presets, cluster files) -> layout.py (what
each rank holds) -> memory.py (fits?) -> cost.py (TTFT, TPOT, throughput by term, as the engine runs) ->
search.py (every layout, ranked or rejected) -> report.py (tables, JSON, dry run); cli.py wires
`meshlm plan` and `--dry-run`. Measuring lives outside: meshlm/calibrate.py writes this host's cluster
file, meshlm/bench.py runs layouts on the engine against the prediction.
"""
