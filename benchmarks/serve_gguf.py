"""Serving on the same GGUF files: `meshlm serve` against llama.cpp's `llama-server`, both under guidellm's load.

    python benchmarks/serve_gguf.py --llama-bin DIR [--guidellm PATH] [--formats F32 Q4_1] [--threads 2]
                                    [--levels 1 4 16] [--prompt-tokens 256] [--output-tokens 128]
                                    [--requests-per-stream 4] [--json out.json] [--plot docs/img/serve_gguf.png]
    python benchmarks/serve_gguf.py --report out.json [--plot ...]     # the table and chart again

The weights: the bundled SmolLM2-135M-Instruct Q4_1 GGUF and its F32 requantization by llama.cpp's own
`llama-quantize` (decode_gguf.gguf_file). Each engine reads the file as it is (`meshlm serve --model FILE`;
`llama-server -m FILE`) with T threads (`--threads T`; `-t T -tb T`), at least max(levels) requests at once
(`--max-num-seqs`; `--parallel` slots of prompt + output + 128 tokens each), on 127.0.0.1.
The load: guidellm (`guidellm run`), the same for both: streaming /v1/completions requests of seeded
synthetic text (the same prompts for both), --prompt-tokens long by the model's tokenizer, asking for exactly
--output-tokens (guidellm sends max_tokens and ignore_eos); its `concurrent` profile keeps c streams busy,
c in --levels, for max(8, --requests-per-stream x c) requests per level. Per level: output tokens/s (all
output tokens over the level's wall time), TTFT p50 / p95 and inter-token latency p50, as guidellm measures
them. Every request must finish with exactly --output-tokens tokens by the server's own count, or the run
stops. Each engine is started, health-checked and warmed up (max(levels) concurrent short requests) before
its levels and stopped (its process group killed) after; the engine going first alternates between formats.
Each level holds the benchmarks' lock and waits for quiet (common.quiet_run); "other load" is the largest
share of the CPUs that processes outside this one's tree used during a level. guidellm shares the host's
cores with both engines alike; it lives in its own venv (see INSTALL) and reads the tokenizer from a local
folder (no network).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import httpx
from decode_gguf import gguf_file

from meshlm.parallel.launch import free_port

FORMATS = ["F32", "Q4_1"]
ENGINES = ("meshlm", "llama-server")
GUIDELLM_VENV = Path("/work/guidellm-venv/bin/guidellm")
WORK = common.CACHE / "serve_gguf"  # servers' and guidellm's logs and raw results of the last run
INSTALL = "python -m venv ~/guidellm-venv && ~/guidellm-venv/bin/pip install guidellm"


def find_guidellm(arg: str | None) -> str:
    """The guidellm executable: --guidellm, else `guidellm` on PATH, else the shared venv's."""
    exe = arg or shutil.which("guidellm") or (str(GUIDELLM_VENV) if GUIDELLM_VENV.exists() else None)
    if exe is None or not Path(exe).exists() and shutil.which(exe) is None:
        sys.exit(f"guidellm not found ({arg or 'not on PATH'}): install it in its own venv ({INSTALL}) and pass "
                 "--guidellm ~/guidellm-venv/bin/guidellm.")
    return exe


class Server:
    """One engine's server process (its own process group), health-checked and warmed up; a context manager."""

    def __init__(self, name: str, cmd: list[str], port: int, model: str, log: Path, env: dict | None = None):
        self.name, self.url, self.model, self.log = name, f"http://127.0.0.1:{port}", model, log
        common.log(f"starting {name}: {' '.join(cmd)}")
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def __enter__(self) -> Server:
        try:
            self._wait_healthy(timeout_s=900)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self, timeout_s: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was healthy:\n"
                                   + self.log.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    common.log(f"{self.name} healthy after {time.time() - t0:.0f} s")
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f} s; its log: {self.log}")

    def warm_up(self, streams: int, prompt_tokens: int) -> None:
        """`streams` concurrent requests of about prompt_tokens tokens and 8 new tokens, all 200."""
        body = {"model": self.model, "prompt": " ".join(["hello"] * prompt_tokens), "max_tokens": 8,
                "ignore_eos": True, "temperature": 0}
        with httpx.Client(timeout=600) as c, ThreadPoolExecutor(streams) as pool:
            codes = list(pool.map(lambda _: c.post(self.url + "/v1/completions", json=body).status_code,
                                  range(streams)))
        if any(code != 200 for code in codes):
            raise RuntimeError(f"{self.name} warm-up failed with HTTP {codes}; its log: {self.log}")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 60 s, then SIGKILL to whatever of the group is left."""
        if self.proc.poll() is None:
            common.log(f"stopping {self.name}")
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(engine: str, path: Path, args: argparse.Namespace, threads: int, log: Path) -> Server:
    """The engine's server on `path` with `threads` threads and max(levels) seats."""
    port, seats = free_port(), max(16, max(args.levels))
    if engine == "meshlm":
        cmd = [sys.executable, "-m", "meshlm.cli", "serve", "--model", str(path), "--threads", str(threads),
               "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(seats),
               "--kv-cache-mb", str(args.kv_cache_mb)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MESHLM_THREADS": str(threads)}
        return Server(engine, cmd, port, str(path), log, env)
    ctx = seats * (args.prompt_tokens + args.output_tokens + 128)  # -c is split evenly among the slots
    cmd = [str(args.llama_bin / "llama-server"), "-m", str(path), "-t", str(threads), "-tb", str(threads),
           "--parallel", str(seats), "-c", str(ctx), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    return Server(engine, cmd, port, str(path), log)


def run_level(srv: Server, streams: int, requests: int, args: argparse.Namespace, work: Path) -> dict:
    """guidellm at `streams` concurrent streams for `requests` requests: its figures, checked."""
    out = work / f"{srv.name}-c{streams}.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": srv.url, "model": srv.model,
                    "request_format": "/v1/completions"},
        "profile": {"kind": "concurrent", "streams": [streams]},
        "tokenizer": {"kind": "huggingface_auto", "model": str(args.tokenizer)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens,
                  "output_tokens": args.output_tokens}],
        "constraints": [{"kind": "max_requests", "count": requests}],
        "outputs": [{"kind": "json", "path": str(out)}]}}
    (work / "scenario.json").write_text(json.dumps(scenario))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # guidellm's venv, not meshlm's
    log = work / f"guidellm-{srv.name}-c{streams}.log"
    with common.quiet_run(args.wait), common.other_load() as other, open(log, "w") as f:
        rc = subprocess.run([args.guidellm, "run", "-c", str(work / "scenario.json"), "--disable-console-interactive"],
                            stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not out.exists():
        raise RuntimeError(f"guidellm failed ({rc}) against {srv.name} at {streams} streams:\n"
                           + log.read_text()[-3000:])
    bench = json.loads(out.read_text())["benchmarks"][0]
    ok, m = bench["requests"]["successful"], bench["metrics"]
    failed = m["request_totals"]["errored"] + m["request_totals"]["incomplete"]
    short = sorted({r["output_tokens"] for r in ok if r["output_tokens"] != args.output_tokens})
    if failed or short or len(ok) < requests:
        raise RuntimeError(f"{srv.name} at {streams} streams: {len(ok)}/{requests} requests completed, "
                           f"{failed} failed, output token counts {short or 'all right'} (asked for "
                           f"{args.output_tokens}); the figures would not compare. guidellm log: {log}")

    def pct(name: str, q: str) -> float:
        return m[name]["successful"]["percentiles"][q]

    return dict(tok_s=m["output_tokens_per_second"]["successful"]["mean"],
                ttft_p50_ms=pct("time_to_first_token_ms", "p50"), ttft_p95_ms=pct("time_to_first_token_ms", "p95"),
                itl_p50_ms=pct("inter_token_latency_ms", "p50"), requests=len(ok), duration_s=bench["duration"],
                output_tokens=sum(r["output_tokens"] for r in ok),
                prompt_tokens_p50=common.median([r["prompt_tokens"] for r in ok]), other_load=other[0])


def measure(fmt: str, threads: int, first: str, args: argparse.Namespace, work: Path) -> list[dict]:
    """Both engines on one (format, threads), `first` first: one row per level."""
    path = gguf_file(fmt, args.llama_bin)
    got: dict[str, dict[int, dict]] = {}
    for engine in sorted(ENGINES, key=lambda e: e != first):
        got[engine] = {}
        with start(engine, path, args, threads, work / f"{engine}-{fmt}-t{threads}.log") as srv:
            srv.warm_up(max(args.levels), args.prompt_tokens)
            for c in args.levels:
                n = args.max_requests or max(8, args.requests_per_stream * c)
                r = got[engine][c] = run_level(srv, c, n, args, work)
                common.log(f"  {fmt} t={threads} {engine} c={c}: {r['tok_s']:.1f} output tok/s, TTFT p50 "
                           f"{r['ttft_p50_ms']:.0f} ms, ITL p50 {r['itl_p50_ms']:.1f} ms ({r['requests']} requests)")
    return [dict(format=fmt, threads=threads, file=path.name, streams=c, meshlm=got["meshlm"][c],
                 llama=got["llama-server"][c]) for c in args.levels]


def table(rows: list[dict]) -> str:
    """Markdown table: one row per (format, threads, streams)."""
    head = ("| format | threads | streams | llama-server tok/s | meshlm tok/s | meshlm / llama-server | "
            "TTFT p50 / p95 ms llama-server | TTFT p50 / p95 ms meshlm | ITL p50 ms llama-server | ITL p50 ms meshlm | "
            "requests | other load |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['format']} | {r['threads']} | {r['streams']} | {r['llama']['tok_s']:.1f} | {r['meshlm']['tok_s']:.1f} | "
        f"{r['meshlm']['tok_s'] / r['llama']['tok_s']:.2f}x | {r['llama']['ttft_p50_ms']:.0f} / "
        f"{r['llama']['ttft_p95_ms']:.0f} | {r['meshlm']['ttft_p50_ms']:.0f} / {r['meshlm']['ttft_p95_ms']:.0f} | "
        f"{r['llama']['itl_p50_ms']:.1f} | {r['meshlm']['itl_p50_ms']:.1f} | {r['meshlm']['requests']} | "
        f"{max(r['meshlm']['other_load'], r['llama']['other_load']):.0%} |" for r in rows)


def plot(rows: list[dict], path: str) -> None:
    """Output tokens/s and TTFT p50 against streams, a line per (engine, format, threads); saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    groups = sorted({(r["format"], r["threads"]) for r in rows}, key=str)
    for i, (fmt, threads) in enumerate(groups):
        rs = [r for r in rows if (r["format"], r["threads"]) == (fmt, threads)]
        xs = [r["streams"] for r in rs]
        for key, label, style in (("llama", "llama-server", "--"), ("meshlm", "meshlm", "-")):
            kw = dict(color=f"C{i}", ls=style, marker="o" if key == "meshlm" else "s")
            a.plot(xs, [r[key]["tok_s"] for r in rs], label=f"{label} {fmt} {threads} thr", **kw)
            b.plot(xs, [r[key]["ttft_p50_ms"] / 1000 for r in rs], label=f"{label} {fmt} {threads} thr", **kw)
        for r in rs:
            a.annotate(f"{r['meshlm']['tok_s'] / r['llama']['tok_s']:.2f}x", (r["streams"], r["meshlm"]["tok_s"]),
                       ha="center", va="bottom", fontsize=7, color=f"C{i}")
    for ax, ylabel in ((a, "output tokens/s"), (b, "TTFT p50 (s)")):
        xs = sorted({r["streams"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent streams (guidellm)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    r0 = rows[0]["meshlm"]
    fig.suptitle(f"SmolLM2-135M GGUF served on {common.machine().split(',')[0]}: about {r0['prompt_tokens_p50']:.0f}"
                 f"-token prompts, {r0['output_tokens'] // r0['requests']} new tokens", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    common.log(f"wrote {path}")


def report(res: dict, plot_path: str | None) -> None:
    """Print the table (stdout) and draw the chart."""
    a = res["args"]
    print(f"{res['machine']}; guidellm concurrent, {a['prompt_tokens']}-token prompts, {a['output_tokens']} new "
          "tokens; output tokens/s over each level's wall time\n")
    print(table(res["rows"]))
    if plot_path and res["rows"]:
        plot(res["rows"], plot_path)


def main() -> None:
    """Measure every (format, threads) on both engines, then print the table and draw the chart."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("MESHLM_LLAMA_BIN"),
                    help="folder with llama-server and llama-quantize (or $MESHLM_LLAMA_BIN)")
    ap.add_argument("--guidellm", default=None, help=f"guidellm executable (default: on PATH, else {GUIDELLM_VENV})")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="local Hugging Face folder with the model's tokenizer (default: the bundled model's)")
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=["F32", "BF16", "Q8_0", "Q4_0", "Q4_1"])
    ap.add_argument("--threads", nargs="+", type=int, default=[2])
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 4, 16], help="concurrent streams")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--requests-per-stream", type=int, default=4, help="requests per level: max(8, this x streams)")
    ap.add_argument("--max-requests", type=int, default=None, help="requests per level (overrides the above)")
    ap.add_argument("--kv-cache-mb", type=float, default=512, help="meshlm's KV cache")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for other CPU load to drop")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="docs/img/serve_gguf.png")
    ap.add_argument("--report", default=None, metavar="JSON", help="print the table and plot of an earlier run")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()), args.plot)
        return
    if args.llama_bin is None or not (args.llama_bin / "llama-server").exists():
        sys.exit("llama.cpp binaries not found: pass --llama-bin DIR (or set MESHLM_LLAMA_BIN) with llama-server and "
                 "llama-quantize, built from the llama-cpp-python sdist (see docs/benchmarks.md).")
    args.guidellm = find_guidellm(args.guidellm)
    if args.tokenizer is None:
        from meshlm.checkpoint.cache import converted_folder, default_gguf_path

        args.tokenizer = converted_folder(default_gguf_path(), progress=False)
    common.log(common.machine())
    res = dict(machine=common.machine(), args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               rows=[])
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    i = 0
    for fmt in args.formats:
        for threads in args.threads:
            res["rows"] += measure(fmt, threads, ENGINES[i % 2], args, WORK)
            i += 1
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))
    report(res, args.plot)


if __name__ == "__main__":
    main()
