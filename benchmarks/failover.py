"""`meshlm serve --dp 2` under guidellm: the three regimes, then a replica's rank killed mid-stream.

    python benchmarks/failover.py [--model PATH] [--tp 1] [--dp 2] [--guidellm PATH] [--tokenizer DIR]
                                  [--prompt-tokens 128] [--output-tokens 128] [--rate 2] [--burst 64]
                                  [--streams 8] [--requests 64] [--kill-after 5] [--signal KILL|STOP]
                                  [--rank 0] [--json out.json]

One server (`meshlm serve --dp D --tp T`, its own process group) and guidellm (`guidellm run`, its own venv)
sending streaming /v1/completions of seeded synthetic text, --prompt-tokens long by the model's tokenizer,
asking for exactly --output-tokens (max_tokens with ignore_eos). Phases, each one guidellm benchmark:
  floor     `synchronous`: one request at a time (8 requests): the latency floor;
  normal    `poisson` at --rate requests/s (4 x rate x 8 requests): normal operation;
  overload  `throughput`: --burst requests at once, beyond the servers' seats: overload (429s are counted);
  failover  `concurrent` at --streams streams for --requests requests; --kill-after seconds after replica 0
            starts running requests, --signal goes to rank --rank of replica 0 (rank 0 is the replica's own
            process; SIGSTOP is a hang).
For the failover phase: requests lost (guidellm's errored + incomplete requests, and successful ones with
fewer than --output-tokens tokens), time to detect (signal -> /health/0 answering 503, polled every 20 ms;
and the server's meshlm_replica_last_detect_seconds), time to recover (signal -> /health/0 answering 200
again; and meshlm_replica_last_recover_seconds), and request latency / TTFT / inter-token latency p50 and p95
of the requests that overlapped the recovery window against those that did not. Each phase holds the
benchmarks' lock and waits for quiet (common.quiet_run). Smoke: --output-tokens 16 --requests 16 --rate 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import common
import httpx
from serve_gguf import Server, find_guidellm

from meshlm.parallel.launch import free_port
from meshlm.serve.metrics import parse_samples

WORK = common.CACHE / "failover"


def guidellm(args: argparse.Namespace, srv: Server, name: str, profile: dict, requests: int) -> dict:
    """One guidellm benchmark against srv: its JSON benchmark entry."""
    out = WORK / f"{name}.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": srv.url, "model": srv.model,
                    "request_format": "/v1/completions"},
        "profile": profile,
        "tokenizer": {"kind": "huggingface_auto", "model": str(args.tokenizer)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens,
                  "output_tokens": args.output_tokens}],
        "constraints": [{"kind": "max_requests", "count": requests}],
        "outputs": [{"kind": "json", "path": str(out)}]}}
    (WORK / f"{name}-scenario.json").write_text(json.dumps(scenario))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # guidellm's venv, not meshlm's
    log = WORK / f"guidellm-{name}.log"
    with open(log, "w") as f:
        rc = subprocess.run([args.guidellm, "run", "-c", str(WORK / f"{name}-scenario.json"),
                             "--disable-console-interactive"], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not out.exists():
        raise RuntimeError(f"guidellm failed ({rc}) in phase {name}:\n" + log.read_text()[-3000:])
    return json.loads(out.read_text())["benchmarks"][0]


def summary(bench: dict, output_tokens: int, window: tuple[float, float] | None = None) -> dict:
    """Counts and percentiles of a guidellm benchmark; with a window, split by overlap with it."""
    reqs = bench["requests"]
    ok = reqs["successful"]
    short = [r for r in ok if r["output_tokens"] != output_tokens]
    res = dict(successful=len(ok), errored=len(reqs["errored"]), incomplete=len(reqs["incomplete"]),
               short=len(short), lost=len(reqs["errored"]) + len(reqs["incomplete"]) + len(short))

    def stats(rows: list[dict]) -> dict:
        def pct(key: str, q: float) -> float | None:
            xs = [r[key] for r in rows if r.get(key) is not None]
            return common.percentile(xs, q) if xs else None

        return dict(n=len(rows), latency_p50_s=pct("request_latency", 50), latency_p95_s=pct("request_latency", 95),
                    ttft_p50_ms=pct("time_to_first_token_ms", 50), ttft_p95_ms=pct("time_to_first_token_ms", 95),
                    itl_p50_ms=pct("inter_token_latency_ms", 50), itl_p95_ms=pct("inter_token_latency_ms", 95))

    if window is None:
        res["all"] = stats(ok)
    else:
        lo, hi = window
        during = [r for r in ok if r["request_start_time"] < hi and r["request_end_time"] > lo]
        res["during_recovery"] = stats(during)
        res["outside_recovery"] = stats([r for r in ok if r not in during])
    return res


def replica_pids(srv: Server, replica: int) -> list[int]:
    """Replica's rank 0 and the ranks it spawned (children in /proc)."""
    pid = httpx.get(srv.url + "/health", timeout=5).json()["replicas"][replica]["pid"]
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    cmd = (d / "cmdline").read_bytes()
                    if b"resource_tracker" not in cmd:
                        kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return [pid, *sorted(kids)]


def chaos(srv: Server, args: argparse.Namespace, out: dict) -> None:
    """--kill-after s after the load reaches replica 0: signal the rank, then time /health/0 going 503 and
    coming back to 200."""
    key = 'meshlm_replica_num_requests_running{replica="0"}'
    while parse_samples(httpx.get(srv.url + "/metrics", timeout=10).text).get(key, 0) == 0:
        time.sleep(0.1)
    time.sleep(args.kill_after)
    pid = replica_pids(srv, 0)[args.rank]
    out["signal_at"] = t0 = time.time()
    os.kill(pid, getattr(signal, f"SIG{args.signal}"))
    while time.time() - t0 < 600:
        code = httpx.get(srv.url + "/health/0", timeout=5).status_code
        if code == 503 and "detect_s" not in out:
            out["detect_s"] = time.time() - t0
        if code == 200 and "detect_s" in out:
            out["recover_s"] = time.time() - t0
            out["readmitted_at"] = time.time()
            return
        time.sleep(0.02)


def main() -> None:
    """Run the phases and print (and save) the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or GGUF (default: the bundled SmolLM2)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="local HF folder with the model's tokenizer")
    ap.add_argument("--guidellm", default=None)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--kv-cache-mb", type=float, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--rate", type=float, default=2.0, help="poisson phase: requests per second")
    ap.add_argument("--burst", type=int, default=64, help="overload phase: requests at once")
    ap.add_argument("--streams", type=int, default=8, help="failover phase: concurrent streams")
    ap.add_argument("--requests", type=int, default=64, help="failover phase: requests")
    ap.add_argument("--kill-after", type=float, default=5.0, help="seconds after the load reaches replica 0")
    ap.add_argument("--signal", choices=["KILL", "STOP"], default="KILL")
    ap.add_argument("--rank", type=int, default=0, help="which rank of replica 0 gets the signal")
    ap.add_argument("--phases", default="floor,normal,overload,failover")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a quiet machine per phase")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.guidellm = find_guidellm(args.guidellm)
    if args.tokenizer is None:
        if args.model is None:
            from meshlm.checkpoint.cache import converted_folder, default_gguf_path

            args.tokenizer = converted_folder(default_gguf_path(), progress=False)
        else:
            args.tokenizer = Path(args.model)
    WORK.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "meshlm.cli", "serve", "--dp", str(args.dp), "--tp", str(args.tp),
           "--threads", str(args.threads), "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-mb", str(args.kv_cache_mb)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "MESHLM_THREADS": str(args.threads)}
    res: dict = dict(machine=common.machine(), command=" ".join(cmd), args=vars(args) | {
        "tokenizer": str(args.tokenizer)}, phases={})
    phases = args.phases.split(",")
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    with Server("meshlm", cmd, port, name, WORK / "server.log", env) as srv:
        srv.model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        srv.warm_up(args.streams, args.prompt_tokens)
        plan = {"floor": ({"kind": "synchronous"}, 8),
                "normal": ({"kind": "poisson", "rate": [args.rate]}, max(8, int(4 * args.rate * 8))),
                "overload": ({"kind": "throughput", "max_concurrency": args.burst}, args.burst),
                "failover": ({"kind": "concurrent", "streams": [args.streams]}, args.requests)}
        for phase in phases:
            profile, n = plan[phase]
            common.log(f"phase {phase}: {profile}, {n} requests")
            with common.quiet_run(args.wait):
                if phase != "failover":
                    res["phases"][phase] = summary(guidellm(args, srv, phase, profile, n), args.output_tokens)
                    continue
                events: dict = {}
                t = threading.Thread(target=chaos, args=(srv, args, events), daemon=True)
                t.start()
                bench = guidellm(args, srv, phase, profile, n)
                t.join(600)
            window = (events.get("signal_at", 0.0), events.get("readmitted_at", time.time()))
            m = parse_samples(httpx.get(srv.url + "/metrics", timeout=10).text)
            res["phases"][phase] = summary(bench, args.output_tokens, window) | dict(
                signal=args.signal, rank=args.rank, detect_s=events.get("detect_s"), recover_s=events.get("recover_s"),
                server_detect_s=m.get('meshlm_replica_last_detect_seconds{replica="0"}'),
                server_recover_s=m.get('meshlm_replica_last_recover_seconds{replica="0"}'),
                migrated=m.get("meshlm_requests_migrated_total"), server_lost=m.get("meshlm_requests_lost_total"))
        res["rejected_429"] = parse_samples(httpx.get(srv.url + "/metrics", timeout=10).text).get(
            'meshlm_requests_rejected_total{reason="queue_full"}', 0.0)
    print(json.dumps(res["phases"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
