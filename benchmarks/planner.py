"""Planner: does it rank the layouts this host can run as the engine measures them?

    python benchmarks/planner.py [--model PATH] [--profile PATH] [--batch 4] [--prompt 128] [--new 32]
        [--runs 3] [--layouts tp=1 tp=2 pp=2 pp=2,tp=2] [--json out.json]
        [--png docs/img/planner_cpu.png]

First this host is calibrated (meshlm/calibrate.py, `meshlm plan --calibrate`) unless --profile names a
saved cluster file. Then every layout (tp and pp of 1-2; over both local transports, shm and gloo, where it
has tp collectives) is predicted by the planner (meshlm.plan.cost) and measured on the engine path
(meshlm.bench.run_layout: meshlm.LLM.generate, continuous batching at any pp, each rank cores // ranks
threads) in a fresh process, holding the benchmarks' lock on a quiet machine (common.quiet_run). The
workload: --batch prompts of --prompt random tokens arriving together, --new tokens each; decode tok/s
= batch / TPOT and TTFT = the batch's last first token, medians of --runs after a warm-up.
Printed: a table per figure (layout, predicted, measured, predicted rank, measured rank), how many pairs
of layouts the prediction orders as measured, and whether the planner's first choice (its best
prediction) measures within 10% of the measured best. Progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("tp=1", "tp=2", "pp=2", "pp=2,tp=2")
FIGURES = (("tok_s", "decode tok/s", True), ("ttft", "TTFT ms", False))  # (key, label, higher is better)


def one(args: argparse.Namespace, layout: str, transport: str) -> dict:
    """Bench one layout in this process (called in a fresh child): meshlm.bench's result as a dict."""
    from meshlm.bench import run_layout
    from meshlm.plan import cluster as clusters
    from meshlm.plan.layout import Layout, Workload

    work = Workload(prompt_tokens=args.prompt, output_tokens=args.new, batch=args.batch)
    with common.quiet_run(args.wait) as busy:
        res = run_layout(args.model, Layout.parse(layout), clusters.load_file(args.profile), work, args.runs,
                         transport=transport or None)
    return {**res.as_dict(), "requested": layout, "requested_transport": transport, "other_load": busy}


def child(args: argparse.Namespace, layout: str, transport: str) -> dict:
    """Run `one` in a fresh interpreter so every layout starts from a clean process."""
    cmd = [sys.executable, __file__, "--one", layout, transport, "--profile", args.profile, "--runs",
           str(args.runs), "--prompt", str(args.prompt), "--new", str(args.new), "--batch", str(args.batch),
           "--wait", str(args.wait)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        common.log(done.stderr[-2000:])
        return {"requested": layout, "requested_transport": transport, "skipped": "crashed", "name": layout}
    return json.loads(done.stdout.strip().splitlines()[-1])


def options(layouts: list[str]) -> list[tuple[str, str]]:
    """(layout, transport) to run: both local transports for a layout with tp collectives."""
    from meshlm.parallel import shm
    from meshlm.plan.layout import Layout

    transports = ("shm", "gloo") if shm.supported() else ("gloo",)
    return [(lay, t) for lay in layouts for t in (transports if Layout.parse(lay).tp > 1 else ("",))]


def ranks(values: list[float], higher: bool) -> list[int]:
    """1-based rank of each value, best first."""
    order = sorted(range(len(values)), key=lambda i: -values[i] if higher else values[i])
    return [order.index(i) + 1 for i in range(len(values))]


def score(results: list[dict], key: str, higher: bool) -> dict:
    """Ranks, pairs ordered as measured, and the first choice against the measured best, for one figure."""
    ok = [r for r in results if not r.get("skipped")]
    pred = [r["predicted"][key] for r in ok]
    meas = [r["measured"][key] for r in ok]
    sign = 1 if higher else -1
    pairs = list(itertools.combinations(range(len(ok)), 2))
    agree = sum((pred[i] - pred[j]) * (meas[i] - meas[j]) > 0 for i, j in pairs)
    first = ranks(pred, higher).index(1) if ok else 0
    best = max(meas, key=lambda v: sign * v) if ok else 0.0
    gap = (best - meas[first]) / best * sign if ok else 0.0  # how far the first choice is behind the best
    return {"names": [r["name"] for r in ok], "predicted": pred, "measured": meas,
            "predicted_rank": ranks(pred, higher), "measured_rank": ranks(meas, higher),
            "pairs_agree": agree, "pairs": len(pairs), "first_choice": ok[first]["name"] if ok else "",
            "first_choice_behind_best": gap, "first_choice_within_10pct": gap <= 0.10}


def table(s: dict, label: str, scale: float) -> str:
    """Markdown: layout, predicted, measured, predicted rank, measured rank; then the two verdicts."""
    rows = [f"| layout | predicted {label} | measured {label} | predicted rank | measured rank |",
            "|---|---:|---:|---:|---:|"]
    for i, name in enumerate(s["names"]):
        rows.append(f"| {name} | {s['predicted'][i] * scale:.1f} | {s['measured'][i] * scale:.1f} | "
                    f"{s['predicted_rank'][i]} | {s['measured_rank'][i]} |")
    rows.append(f"\nPairs ordered as measured: {s['pairs_agree']} of {s['pairs']}. First choice "
                f"{s['first_choice']}: {s['first_choice_behind_best']:.0%} behind the measured best "
                f"({'within' if s['first_choice_within_10pct'] else 'NOT within'} 10%).")
    return "\n".join(rows)


def plot(scores: dict, path: Path) -> None:
    """Predicted and measured bars per layout, one panel per figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIGURES), figsize=(12, 4.5))
    for ax, (key, label, _) in zip(axes, FIGURES):
        s, k = scores[key], (1e3 if key == "ttft" else 1.0)
        xs = range(len(s["names"]))
        ax.bar([x - 0.2 for x in xs], [v * k for v in s["predicted"]], 0.4, label="predicted")
        ax.bar([x + 0.2 for x in xs], [v * k for v in s["measured"]], 0.4, label="measured")
        ax.set_xticks(list(xs), s["names"], rotation=20)
        ax.set_title(f"{label}: {s['pairs_agree']}/{s['pairs']} pairs ordered as measured")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    """Calibrate (or load a profile), predict and measure every layout, print the ranking verdicts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2-135M)")
    ap.add_argument("--profile", default=None, help="cluster file to predict with (default: calibrate now)")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for a quiet machine per layout")
    ap.add_argument("--quick-calibration", action="store_true", help="calibrate with --quick (smoke runs)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--png", default=None, help="write a bar chart here")
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args, *args.one)))
        return 0
    from meshlm.calibrate import calibrate, summary
    from meshlm.plan import cluster as clusters

    if args.profile is None:
        common.log("calibrating this host (meshlm plan --calibrate)")
        with common.quiet_run(args.wait):
            prof = calibrate(quick=args.quick_calibration)
        args.profile = str(clusters.save(prof, common.CACHE / "planner-profile.yaml"))
        common.log(summary(prof, Path(args.profile)))
    results = []
    for layout, transport in options(args.layouts):
        common.log(f"{layout} {transport or ''}".strip())
        results.append(child(args, layout, transport))
    scores = {key: score(results, key, higher) for key, _, higher in FIGURES}
    print(f"Machine: {common.machine()}. Model: {args.model or 'SmolLM2-135M-Instruct (bundled)'}, float32; "
          f"{args.batch} prompts of {args.prompt} tokens arriving together, {args.new} new tokens each; "
          f"medians of {args.runs} runs; profile {args.profile}.\n")
    for key, label, _ in FIGURES:
        print(table(scores[key], label, 1e3 if key == "ttft" else 1.0) + "\n")
    if args.json:
        out = {"machine": common.machine(), "settings": {k: getattr(args, k) for k in
                                                         ("model", "batch", "prompt", "new", "runs", "layouts")},
               "profile": clusters.to_dict(clusters.load_file(args.profile)), "results": results, "scores": scores}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.png:
        plot(scores, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
