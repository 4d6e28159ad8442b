"""Planner: predicted against measured step time, per term, for each layout this host can run.

    python benchmarks/planner.py [--models llama-100m llama-400m] [--layouts tp=1 tp=2 pp=2]
        [--transports auto gloo] [--runs 3] [--prompt 256] [--new 32] [--profile PATH | --calibrate]
        [--png docs/img/planner_cpu.png] [--json out.json]
    python benchmarks/planner.py --report out.json    # tables and plot again: the measurements of that run
                                                      # against the current cost model, its saved profile
    python benchmarks/planner.py --report out.json --profile other.json   # ... against another run's profile

First this host is calibrated (`meshlm plan --calibrate`: fp32 matmul rate, GEMV bandwidth alone and with
every rank streaming, operator overhead, all-reduce alpha/beta per transport, the gloo hop's ping-pong,
and in the engine the wait per all-reduce and the compute between them at tp=2 per transport, and the
per-layer cost of a pp=2 stage), unless
--profile names a saved one; a calibration during which other processes used more than --max-load of the
CPUs is refused and taken again (--attempts). Then each (model, layout, transport) runs in a fresh
process through `meshlm.plan.bench` (1 thread per rank): prefill = one --prompt-token prompt,
max_tokens=1; decode = (a --new-token run minus a 1-token run) / (new - 1), batch 1; medians of --runs
after a warm-up. Every timed process takes the benchmarks' lock and waits for other CPU load to fall
under 20% (common.quiet_run). The host's state is read beside each layout (meshlm.plan.host.HostProbe:
one thread's GEMV rate over the calibration's 512 MB pool and its prefill-shaped matmul rate, 0.5 s each,
before the engine starts, right before every timed run and after it stops; runs before G: before and after
only) and once after the calibration; the calibration keeps its own reading in the profile. Each phase's
predictions are rescaled to the readings beside its runs (bandwidths x now / at calibration, matmul rates
likewise; --no-rescale: the tables and plot from the profile as calibrated); both pass counts are
printed. A saved run without the profile's reading is rescaled against the reading taken after its
calibration (bandwidth only; runs before E have none, so their two counts agree).
Terms: compute, collectives (tp all-reduces and all-gathers, plus the per-
step broadcast of the step's input), pipeline transfers (p2p) and bubble; error = (predicted - measured)
/ measured. Progress goes to stderr; the markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
TERMS = ("compute", "collectives", "p2p", "bubble", "total")  # meshlm.plan.bench.KEYS


def one(model: str, layout: str, transport: str, profile: str, runs: int, prompt: int, new: int,
        wait: float) -> dict:
    """Bench one layout in this process (called in a fresh child); the BenchResult as a dict, with the
    host's readings (at the start, before each timed run, at the end) and the scale per phase they gave
    the profile (meshlm.plan.host)."""
    from meshlm.plan import cluster as clusters
    from meshlm.plan.bench import run_bench
    from meshlm.plan.layout import Layout

    path = str(common.random_llama(model))
    seen: list[float] = []
    # before every timed run; this process holds the run lock itself, so only the CPU load counts
    before = lambda: seen.append(common.wait_quiet(timeout_s=wait, respect_lock=False))
    with common.quiet_run(wait):
        res = run_bench(path, Layout.parse(layout), clusters.load_file(profile), prompt, new, 1, 1, runs,
                        "float32", None if transport == "auto" else transport, before)
    out = res.as_dict()
    out.update(model=model, busy=max(seen, default=0.0), requested_transport=transport)
    return out


def child(args: argparse.Namespace, model: str, layout: str, transport: str) -> dict:
    """Run `one` in a fresh interpreter so every layout starts from a clean process."""
    cmd = [sys.executable, __file__, "--one", model, layout, transport, "--profile", args.profile,
           "--runs", str(args.runs), "--prompt", str(args.prompt), "--new", str(args.new),
           "--wait", str(args.wait)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        common.log(done.stderr[-2000:])
        return {"model": model, "layout": layout, "requested_transport": transport, "skipped": "crashed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_of(raw: dict):
    """The run's calibration-time host reading: the profile's own, else the reading planner.py took right
    after the calibration (runs before the profile kept one: bandwidth only)."""
    from meshlm.plan import cluster as clusters
    from meshlm.plan.host import HostReading, reference

    ref = reference(clusters.from_dict(raw["profile"]))
    if ref is None and raw.get("host_gbs_after_profile"):
        ref = HostReading(raw["host_gbs_after_profile"] * 1e9, raw.get("host_gflops_after_profile", 0.0) * 1e9)
    return ref


def readings_of(r: dict) -> list:
    """A result's host readings, labelled by when they were taken (runs before G: before and after its runs,
    unlabelled; before F: the bandwidth only)."""
    from meshlm.plan.host import HostReading

    if r.get("host"):
        return [HostReading.from_dict(h) for h in r["host"]]
    return [HostReading(g * 1e9) for g in r.get("host_gbs") or ()]


def repredict(raw: dict, rescaled: bool = True) -> list[dict]:
    """The results of a saved run, each with its predictions recomputed by the current cost model:
    `unscaled` from the profile as calibrated, `predicted` with each phase from it rescaled to the host
    readings beside that phase's runs (bench.rescaled_terms; older runs: all of the layout's readings), when
    `rescaled` and the run has readings (else the same as `unscaled`); `scale` the factors per phase."""
    from meshlm.config import ModelConfig
    from meshlm.plan import cluster as clusters
    from meshlm.plan.bench import predicted_terms, rescaled_terms
    from meshlm.plan.layout import Layout

    prof, run = clusters.from_dict(raw["profile"]), raw.get("settings", {"prompt": 256, "new": 32})
    ref = reference_of(raw)
    out = []
    for r in raw["results"]:
        if not r.get("skipped"):
            cfg = ModelConfig.from_hf(json.loads((common.random_llama(r["model"]) / "config.json").read_text()))
            lay, tr = Layout.parse(r["layout"]), r["transport"]
            args = (cfg, lay, prof, run["prompt"], run["new"], 1, "float32", tr)
            pred, scales = rescaled_terms(*args, ref if rescaled else None, readings_of(r))
            r = {**r, "unscaled": predicted_terms(*args), "predicted": pred,
                 "scale": {ph: {"bandwidth": s.bandwidth, "matmul": s.matmul} for ph, s in scales.items()}}
        out.append(r)
    return out


def passes(results: list[dict], key: str = "predicted", band: float = 0.2) -> tuple[int, int]:
    """(totals within `band` of measured, totals) over both phases of every result not skipped."""
    errs = [(r[key][ph]["total"] - r["measured"][ph]["total"]) / r["measured"][ph]["total"]
            for r in results if not r.get("skipped") and r.get(key) for ph in ("prefill", "decode")]
    return sum(abs(e) <= band for e in errs), len(errs)


def table(results: list[dict]) -> str:
    """Markdown: one row per (model, layout, phase, term) with predicted, measured and error."""
    rows = ["| model | layout | transport | phase | term | predicted ms | measured ms | error | host scale |",
            "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        if r.get("skipped"):
            rows.append(f"| {r['model']} | {r['layout']} | {r['requested_transport']} | - | - | - | - | "
                        f"skipped: {r['skipped']} | - |")
            continue
        for phase in ("prefill", "decode"):
            for t in TERMS:
                p, m = r["predicted"][phase][t], r["measured"][phase][t]
                if t not in ("compute", "total") and p < 1e-6 and abs(m) < 1e-6:
                    continue
                err = f"{(p - m) / m:+.0%}" if m > 1e-6 else "-"
                bold = "**" if t == "total" else ""
                sc = (r.get("scale") or {}).get(phase)
                scale = f"bw x{sc['bandwidth']:.2f}, mm x{sc['matmul']:.2f}" if sc and t == "total" else ""
                rows.append(f"| {r['model']} | {r['layout']} | {r['transport'] or '-'} | {phase} | "
                            f"{bold}{t}{bold} | {p * 1e3:.2f} | {m * 1e3:.2f} | {bold}{err}{bold} | {scale} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path) -> None:
    """Predicted against measured (log-log), one marker per term, the +-20% band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    markers = dict(zip(TERMS, "os^vX"))
    for ax, phase in zip(axes, ("prefill", "decode")):
        lo, hi = 1e9, 0.0
        for r in (r for r in results if not r.get("skipped")):
            for t in TERMS:
                p, m = r["predicted"][phase][t] * 1e3, r["measured"][phase][t] * 1e3
                if p <= 1e-3 or m <= 1e-3:
                    continue
                lo, hi = min(lo, p, m), max(hi, p, m)
                ax.scatter(m, p, marker=markers[t], s=40 if t == "total" else 22,
                           label=f"{t}", alpha=0.8, color=f"C{TERMS.index(t)}")
        xs = [lo / 1.5, hi * 1.5]
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.fill_between(xs, [x * 0.8 for x in xs], [x * 1.2 for x in xs], color="grey", alpha=0.2, lw=0)
        ax.set(xscale="log", yscale="log", xlabel="measured ms", ylabel="predicted ms",
               title=f"{phase} ({'TTFT' if phase == 'prefill' else 'TPOT'} terms), band = +-20%")
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        ax.legend(seen.values(), seen.keys(), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    """Calibrate (or load a profile), bench every layout, print the tables, write the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama-100m", "llama-400m"])
    ap.add_argument("--layouts", nargs="+", default=["tp=1", "tp=2", "pp=2"])
    ap.add_argument("--transports", nargs="+", default=["auto", "gloo"],
                    help="tp collectives' transports for layouts with tp > 1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--profile", default=None,
                    help="a saved profile (default: calibrate now); with --report, a profile or another "
                         "run's --json whose profile predicts the report's measurements")
    ap.add_argument("--png", default=str(ROOT / "docs" / "img" / "planner_cpu.png"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--attempts", type=int, default=3, help="calibrations to try before giving up")
    ap.add_argument("--max-load", type=float, default=0.2,
                    help="refuse a calibration during which other processes used more of the CPUs")
    ap.add_argument("--report", default=None, help="a --json file: its measurements against the current model")
    ap.add_argument("--no-rescale", action="store_true",
                    help="tables and plot from the profile as calibrated (default: rescaled to the host's "
                         "readings beside each layout; both pass counts are printed either way)")
    ap.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.profile, args.runs, args.prompt, args.new, args.wait)))
        return 0
    from meshlm.plan import cluster as clusters

    if args.report:
        raw = json.loads(Path(args.report).read_text())
        if args.profile:  # another calibration against these measurements (the host reading comes with it)
            other = json.loads(Path(args.profile).read_text())
            raw = {**raw, "profile": other.get("profile", other)}
        report(raw, not args.no_rescale, Path(args.png))
        return 0

    if args.profile is None:
        from meshlm.errors import ConfigError
        from meshlm.plan.calibrate import calibrate

        for attempt in range(args.attempts):  # a calibration refused under load (or unsettled): again
            with common.quiet_run(args.wait):
                common.log("calibrating this host")
                try:
                    prof = calibrate(threads=1, max_load=args.max_load)
                    break
                except ConfigError as e:
                    common.log(f"calibration {attempt + 1} refused: {e}")
        else:
            raise SystemExit("no calibration could be saved; see the reasons above")
        args.profile = str(clusters.save(prof, common.CACHE / "planner-profile.json"))
    from meshlm.plan.host import read_host, reference

    with common.quiet_run(args.wait):
        state = read_host()
    prof = clusters.load_file(args.profile)
    d, ref = prof.node.device, reference(prof)
    common.log(f"profile {args.profile}: {d.flops['float32'] / 1e9:.1f} GFLOP/s, {d.bandwidth / 1e9:.1f} GB/s; "
               f"host reading at calibration "
               + (f"{ref.bandwidth / 1e9:.1f} GB/s, {ref.matmul / 1e9:.1f} GFLOP/s" if ref else "none")
               + f", now {state.bandwidth / 1e9:.1f} GB/s, {state.matmul / 1e9:.1f} GFLOP/s")
    results = []
    for model in args.models:
        for layout in args.layouts:
            for transport in (args.transports if "tp=1" not in layout and "tp" in layout else ["auto"]):
                common.log(f"{model} {layout} {transport}")
                results.append(child(args, model, layout, transport))
                if results[-1].get("host"):
                    common.log("host readings (GB/s GEMV, GFLOP/s matmul) at start, before each run, end: "
                               + " / ".join(f"{h['bandwidth_gbs']:.1f} {h['matmul_gflops']:.0f}"
                                            for h in results[-1]["host"]))
    raw = {"profile": clusters.to_dict(prof), "results": results, "machine": common.machine(),
           "settings": {"prompt": args.prompt, "new": args.new, "runs": args.runs},
           "host_gbs_after_profile": state.bandwidth / 1e9, "host_gflops_after_profile": state.matmul / 1e9}
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    report(raw, not args.no_rescale, Path(args.png))
    return 0


def report(raw: dict, rescaled: bool, png: Path) -> None:
    """Print the profile line, the pass counts with and without rescaling and the table (rescaled or not);
    write the plot."""
    from meshlm.plan import cluster as clusters
    from meshlm.plan.fit import slow_text, wait_text

    prof, results, ref = clusters.from_dict(raw["profile"]), repredict(raw, rescaled), reference_of(raw)
    both = results if rescaled else repredict(raw, True)  # the rescaled pass count is printed either way
    d = prof.node.device
    print(f"Machine: {common.machine()}\n")
    links = "; ".join(f"{ln.transport} alpha {ln.latency * 1e6:.1f} us, beta {ln.bandwidth / 1e9:.2f} GB/s"
                      + wait_text(ln.waits)
                      + slow_text(ln.slows)
                      + (f", hop {ln.hop * 1e6:.0f} us one way" if ln.hop else "") for ln in prof.node.links)
    cap = f"{prof.node.memory_bandwidth / 1e9:.1f}" if prof.node.memory_bandwidth else "-"
    print(f"Profile: fp32 matmul {d.flops['float32'] / 1e9:.1f} GFLOP/s per rank (attention "
          f"{d.attention_eff:.2f} x that), GEMV {d.bandwidth / 1e9:.1f} GB/s per rank ({cap} GB/s both "
          "ranks), "
          f"overhead {d.layer_overhead * 1e6:.0f} us per layer ({d.pipeline_layer_overhead * 1e6:.0f} in a pp=2 "
          f"stage) + {d.step_overhead * 1e6:.0f} us per step; "
          f"{links}\n")
    print("Host reading at calibration: " + (f"GEMV {ref.bandwidth / 1e9:.1f} GB/s, matmul "
          f"{ref.matmul / 1e9:.1f} GFLOP/s" if ref else "none (no rescaling possible)")
          + "; totals within 20%: {} of {} from the profile as calibrated, ".format(*passes(results, "unscaled"))
          + "{} of {} rescaled to the host beside each layout; the table ".format(*passes(both))
          + f"and plot: {'rescaled' if rescaled else 'as calibrated'}\n")
    print(table(results))
    print(f"\nHighest other CPU load seen before a run: {max(r.get('busy', 0.0) for r in results):.0%}")
    plot(results, png)
    common.log(f"plot: {png}")


if __name__ == "__main__":
    sys.exit(main())
