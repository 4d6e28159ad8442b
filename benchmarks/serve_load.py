"""Load on `meshlm serve` over loopback: latency and throughput at rising concurrency, then overload.

    python benchmarks/serve_load.py [--model PATH] [--tp 2] [--levels 1,2,4,8,16] [--json out.json]
                                    [--plot docs/img/serve_load.png]

Closed loop: at concurrency c, c clients each send a streaming /v1/completions request (distinct prompt,
--max-tokens new tokens, ignore_eos) and the next as soon as one ends, 2c requests per level (8 at least).
Latency is send -> [DONE] per request; TTFT is send -> first token chunk; throughput is generated tokens
over the level's wall time. The sweep stops at the first level where the engine's waiting queue grows
(mean /metrics waiting >= 0.5, sampled every 0.1 s): the saturation point, set by --max-num-seqs seats.
Overload: a burst of --burst requests at once against a queue of --max-waiting places: the 429s come at
once; every accepted request completes; then single requests, one after another, show the recovery.
Peer, same run: the offline engine (LLM.generate, no HTTP) on as many requests as there are seats.
Each phase holds the benchmarks' lock and waits for the machine to quieten (common.quiet_run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import common
import httpx

from meshlm.parallel.launch import free_port
from meshlm.serve.metrics import parse_samples

PROMPT = "Request {i}: write a short story about a robot who learns to paint, with a happy ending."


class Server:
    """A `meshlm serve` subprocess."""

    def __init__(self, args: argparse.Namespace) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "meshlm.cli", "serve", "--tp", str(args.tp), "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting),
               "--kv-cache-mb", str(args.kv_cache_mb)] + (["--model", args.model] if args.model else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def stop(self) -> int:
        """SIGTERM and the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


async def one(c: httpx.AsyncClient, srv: Server, i: int, max_tokens: int) -> dict:
    """One streaming request: status, latency, TTFT and tokens."""
    body = {"model": srv.model, "prompt": PROMPT.format(i=i), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "start": t0, "latency": time.perf_counter() - t0, "tokens": 0}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return {"status": 200, "start": t0, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def sample_waiting(srv: Server, out: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """Append (time, waiting requests) every 0.1 s until stop is set."""
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        while not stop.is_set():
            m = parse_samples((await c.get("/metrics")).text)
            out.append((time.perf_counter(), m["meshlm_num_requests_waiting"]))
            await asyncio.sleep(0.1)


async def level(srv: Server, conc: int, n: int, max_tokens: int, base: int) -> dict:
    """n requests from conc closed-loop clients; the latency, TTFT, throughput and queue figures."""
    todo = iter(range(base, base + n))
    results: list[dict] = []
    waiting: list[tuple[float, float]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=conc + 2)
    async with httpx.AsyncClient(base_url=srv.url, timeout=600, limits=limits) as c:
        async def client() -> None:
            for i in todo:
                results.append(await one(c, srv, i, max_tokens))

        sampler = asyncio.create_task(sample_waiting(srv, waiting, stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(conc)))
        wall = time.perf_counter() - t0
        stop.set()
        await sampler
    lat = [r["latency"] for r in results]
    q = [w for _, w in waiting] or [0.0]
    return {"concurrency": conc, "requests": n, "errors": sum(r["status"] != 200 for r in results),
            "p50_s": common.percentile(lat, 50), "p99_s": common.percentile(lat, 99),
            "ttft_p50_s": common.percentile([r.get("ttft") or 0 for r in results], 50),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "requests_per_s": n / wall,
            "waiting_mean": sum(q) / len(q), "waiting_max": max(q), "loadavg_1m": os.getloadavg()[0]}


async def overload(srv: Server, burst: int, max_tokens: int, recovery_s: float) -> dict:
    """A burst at once, then sequential requests until recovery_s after the queue empties."""
    waiting: list[tuple[float, float]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=burst + 4)
    async with httpx.AsyncClient(base_url=srv.url, timeout=600, limits=limits) as c:
        sampler = asyncio.create_task(sample_waiting(srv, waiting, stop))
        t0 = time.perf_counter()
        burst_res = await asyncio.gather(*(one(c, srv, 10_000 + i, max_tokens) for i in range(burst)))
        drained = time.perf_counter()
        after: list[dict] = []
        while time.perf_counter() - drained < recovery_s:
            after.append(await one(c, srv, 20_000 + len(after), max_tokens))
        stop.set()
        await sampler
    ok = [r for r in burst_res if r["status"] == 200]
    rejected = [r for r in burst_res if r["status"] == 429]
    rej = [r["latency"] for r in rejected] or [float("nan")]
    return {"burst": burst, "accepted": len(ok), "rejected_429": len(rejected),
            "other": burst - len(ok) - len(rejected), "completed_tokens": sum(r["tokens"] for r in ok),
            "reject_p50_ms": 1000 * common.percentile(rej, 50), "reject_max_ms": 1000 * max(rej),
            "accepted_p50_s": common.percentile([r["latency"] for r in ok], 50) if ok else None,
            "accepted_p99_s": common.percentile([r["latency"] for r in ok], 99) if ok else None,
            "burst_drain_s": drained - t0, "recovery_requests": len(after),
            "recovery_ok": sum(r["status"] == 200 for r in after),
            "recovery_p50_s": common.percentile([r["latency"] for r in after], 50) if after else None,
            "timeline": {"waiting": [(t - t0, w) for t, w in waiting],
                         "burst": [(r["start"] - t0, r["latency"], r["status"]) for r in burst_res],
                         "after": [(r["start"] - t0, r["latency"], r["status"]) for r in after]}}


def offline_peer(args: argparse.Namespace, n: int) -> dict:
    """The same n requests through LLM.generate (no HTTP, no engine thread): tokens/s."""
    from meshlm import LLM, SamplingParams
    from meshlm.engine.engine import EngineConfig
    from meshlm.engine.scheduler import SchedulerConfig

    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs)
    ecfg = EngineConfig(kv_cache_mb=args.kv_cache_mb, scheduler=sched)
    with LLM(args.model, tp=args.tp, progress=False, engine=ecfg) as llm:
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate([PROMPT.format(i=-1)], params)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate([PROMPT.format(i=30_000 + i) for i in range(n)], params)
        wall = time.perf_counter() - t0
    return {"requests": n, "tokens_per_s": sum(len(o.token_ids) for o in outs) / wall, "wall_s": wall}


def plot(res: dict, path: Path) -> None:
    """Two panels: latency and throughput against concurrency; the overload timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    lv = res["levels"]
    xs = [r["concurrency"] for r in lv]
    a.plot(xs, [r["p50_s"] for r in lv], "o-", label="p50 latency")
    a.plot(xs, [r["p99_s"] for r in lv], "s--", label="p99 latency")
    a.set_xscale("log", base=2)
    a.set_xticks(xs, [str(x) for x in xs])
    a.set_xlabel("concurrent clients")
    a.set_ylabel("request latency (s)")
    a2 = a.twinx()
    a2.plot(xs, [r["tokens_per_s"] for r in lv], "^-", color="tab:green", label="server tokens/s")
    a2.axhline(res["peer"]["tokens_per_s"], color="tab:green", ls=":", label="offline engine tokens/s")
    a2.set_ylabel("generated tokens/s")
    sat = res.get("saturation_concurrency")
    if sat:
        a.axvline(sat, color="grey", ls="-.", label=f"queue grows (c={sat})")
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    a.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    a.set_title("closed-loop load")
    ov = res["overload"]["timeline"]
    for name, color, marker in (("burst", None, "o"), ("after", "tab:purple", "d")):
        for status, c, lab in ((200, color or "tab:blue", "completed"), (429, "tab:red", "429 at once")):
            pts = [(t + lat, lat) for t, lat, st in ov[name] if st == status]
            if pts:
                b.scatter(*zip(*pts), s=12, color=c, marker=marker,
                          label=f"{'burst' if name == 'burst' else 'after'}: {lab}")
    b.set_xlabel("seconds since the burst")
    b.set_ylabel("request latency (s), plotted at its end")
    b2 = b.twinx()
    if ov["waiting"]:
        b2.plot(*zip(*ov["waiting"]), color="grey", lw=1, label="waiting queue")
    b2.set_ylabel("waiting requests")
    h1, l1 = b.get_legend_handles_labels()
    h2, l2 = b2.get_legend_handles_labels()
    b.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    b.set_title(f"overload: burst of {res['overload']['burst']}, then one at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(res: dict) -> str:
    """The tables for docs/benchmarks.md."""
    rows = ["| clients | requests | p50 latency s | p99 latency s | TTFT p50 s | tokens/s | requests/s | "
            "waiting (mean / max) | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["levels"]:
        rows.append(f"| {r['concurrency']} | {r['requests']} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                    f"{r['ttft_p50_s']:.2f} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                    f"{r['waiting_mean']:.1f} / {r['waiting_max']:.0f} | {r['loadavg_1m']:.1f} |")
    o, p = res["overload"], res["peer"]
    rows += ["", f"Offline engine peer (LLM.generate, {p['requests']} requests at once): "
             f"{p['tokens_per_s']:.1f} tokens/s.", "",
             "| burst | accepted | 429 | other | 429 latency p50 / max ms | accepted p50 / p99 s | "
             "drained after s | recovery requests ok | recovery p50 s |", "|---" * 9 + "|",
             f"| {o['burst']} | {o['accepted']} | {o['rejected_429']} | {o['other']} | "
             f"{o['reject_p50_ms']:.0f} / {o['reject_max_ms']:.0f} | "
             f"{o['accepted_p50_s'] or 0:.2f} / {o['accepted_p99_s'] or 0:.2f} | {o['burst_drain_s']:.1f} | "
             f"{o['recovery_ok']}/{o['recovery_requests']} | {o['recovery_p50_s'] or 0:.2f} |"]
    return "\n".join(rows)


def main() -> None:
    """Sweep, overload, peer; write JSON, the plot and markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled SmolLM2-135M)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--levels", default="1,2,4,8,16,32",
                    help="concurrency levels (the sweep stops once the queue grows)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="engine seats: the saturation point")
    ap.add_argument("--max-waiting", type=int, default=16, help="queue places before 429")
    ap.add_argument("--kv-cache-mb", type=float, default=256)
    ap.add_argument("--burst", type=int, default=72, help="overload burst size")
    ap.add_argument("--recovery-s", type=float, default=10.0, help="sequential requests after the burst (s)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a quiet machine")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    res: dict = {"machine": common.machine(), "args": vars(args), "levels": []}
    with common.quiet_run(args.wait) as busy:
        res["other_load_before"] = busy
        common.log("starting the server")
        srv = Server(args)
        try:
            asyncio.run(level(srv, 2, 4, args.max_tokens, 90_000))  # warm-up
            base = 0
            for conc in (int(x) for x in args.levels.split(",")):
                r = asyncio.run(level(srv, conc, max(8, 2 * conc), args.max_tokens, base))
                base += r["requests"]
                res["levels"].append(r)
                common.log(f"c={conc}: p50 {r['p50_s']:.2f}s p99 {r['p99_s']:.2f}s "
                           f"{r['tokens_per_s']:.1f} tok/s, waiting {r['waiting_mean']:.1f}")
                if r["waiting_mean"] >= 0.5:
                    res["saturation_concurrency"] = conc
                    break
            common.log(f"overload: burst of {args.burst}")
            res["overload"] = asyncio.run(overload(srv, args.burst, args.max_tokens, args.recovery_s))
        finally:
            common.log("stopping the server (SIGTERM)")
            t0 = time.perf_counter()
            res["server_exit_code"] = srv.stop()
            res["server_stop_s"] = time.perf_counter() - t0
            common.log(f"server exited with {res['server_exit_code']} after {res['server_stop_s']:.1f} s")
    with common.quiet_run(args.wait):
        common.log("offline peer")
        res["peer"] = offline_peer(args, args.max_num_seqs)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, Path(args.plot))
    print(markdown(res))


if __name__ == "__main__":
    os.environ.setdefault("MESHLM_THREADS", "1")
    main()
