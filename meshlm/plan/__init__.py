"""Planner: choose a dp x pp x tp layout from model, cluster and workload, explain it, check it.

cluster.py (devices, links, presets, profiles) -> layout.py (what each rank holds) -> memory.py (fits?)
-> cost.py (TTFT, TPOT, throughput by term) -> search.py (every layout, ranked or rejected) -> report.py
(tables, JSON, dry run); calibrate.py measures this host, bench.py runs a layout against the prediction,
cli.py wires `meshlm plan`, `meshlm bench` and `--dry-run`.
"""
