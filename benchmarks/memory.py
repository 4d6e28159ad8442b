"""Peak RSS (VmHWM) of every rank of `meshlm generate` and `meshlm serve` (start, one request, stop).

Memory is not a timing figure: it can be measured on a busy machine. Each command runs as a subprocess;
its process tree is polled and each rank's last VmHWM kept (the multiprocessing resource tracker is
skipped). Usage: python benchmarks/memory.py [--tp 1 2] [--serve-tp 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from meshlm.parallel.launch import free_port

PROMPT = "Once upon a time"


def _status(pid: int) -> dict[str, str]:
    try:
        return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return {}


def _tree(pid: int) -> list[int]:
    """pid and its spawned ranks; not the resource tracker, nor a fork about to exec a compiler or a check
    (between fork and exec a child reports its parent's resident pages as its own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        cmdline = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        if p == pid or "spawn_main" in cmdline:
            out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            kids = (task / "children").read_text().split() if (task / "children").exists() else []
            todo += [int(k) for k in kids]
    return out


def _poll(proc: subprocess.Popen, peaks: dict[int, int]) -> None:
    """Record the latest VmHWM (kB) of each process of proc's tree."""
    try:
        for p in _tree(proc.pid):
            hwm = _status(p).get("VmHWM")
            if hwm:
                peaks[p] = max(peaks.get(p, 0), int(hwm.split()[0]))
    except OSError:
        pass  # a process ended while being read


def _ranks(peaks: dict[int, int]) -> list[float]:
    """MB per rank: the root is rank 0, its children follow in pid order."""
    pids = sorted(peaks)
    return [peaks[p] / 1024 for p in pids]


def generate(tp: int, model: str | None) -> list[float]:
    """Peak RSS per rank of one `meshlm generate` run."""
    cmd = [sys.executable, "-m", "meshlm.cli", "generate", PROMPT, "--tp", str(tp), "--max-tokens", "32"]
    cmd += ["--model", model] if model else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        _poll(proc, peaks)
        time.sleep(0.05)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"generate --tp {tp} failed:\n{err}")
    return _ranks(peaks)


def serve(tp: int, model: str | None) -> list[float]:
    """Peak RSS per rank of `meshlm serve`: start, wait for /health, one completion, then read and stop."""
    port = free_port()
    cmd = [sys.executable, "-m", "meshlm.cli", "serve", "--tp", str(tp), "--port", str(port)]
    cmd += ["--model", model] if model else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks: dict[int, int] = {}
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            _poll(proc, peaks)
            if proc.poll() is not None:
                raise SystemExit(f"serve --tp {tp} exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        served = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions", timeout=300,
                       json={"model": served, "prompt": PROMPT, "max_tokens": 32, "temperature": 0})
        r.raise_for_status()
        _poll(proc, peaks)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return _ranks(peaks)


def main() -> None:
    """Print one JSON line per command: {"command", "peak_rss_mb": [rank 0, rank 1, ...]}."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tp", type=int, nargs="*", default=[1, 2], help="generate at these tp degrees")
    ap.add_argument("--serve-tp", type=int, nargs="*", default=[2], help="serve at these tp degrees")
    ap.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2)")
    args = ap.parse_args()
    os.environ.setdefault("MESHLM_DEVICE", "cpu")
    for tp in args.tp:
        print(json.dumps({"command": f"generate --tp {tp}", "peak_rss_mb": [round(x) for x in
                                                                          generate(tp, args.model)]}), flush=True)
    for tp in args.serve_tp:
        print(json.dumps({"command": f"serve --tp {tp}", "peak_rss_mb": [round(x) for x in serve(tp, args.model)]}),
              flush=True)


if __name__ == "__main__":
    main()
