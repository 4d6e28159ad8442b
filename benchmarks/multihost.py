"""tp=2 across two emulated hosts (network namespaces, tests/emulated_hosts.py) at several link rates.

    sudo python benchmarks/multihost.py [--model llama-100m|PATH] [--rates 100mbit 1gbit none] [--runs 3]
        [--prompt-tokens 256] [--max-tokens 64] [--json F]

Each run: two hosts on a private switch, both directions of each host's link shaped by tc tbf at the rate
(`none`: unshaped veth), one torchrun node per host (c10d rendezvous on host 0), `meshlm generate --tp 2`
with a random-init checkpoint (common.random_llama) or a given folder/GGUF. The tp group's all-reduces
cross the link over gloo (the hosts have distinct hostnames). Reported: TTFT of a --prompt-tokens prompt
(prefill all-reduces carry prompt x hidden floats, where bandwidth shows) and batch-1 decode tok/s
(3 KB all-reduces at llama-100m, where latency shows), medians of --runs, and rank 0's share of time in
collectives. This kernel has no netem, so no latency is added: the unshaped link is a veth's ~20 us.
Each run takes the benchmarks' lock and waits for a quiet machine (common.quiet_run). Needs root.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import common

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from emulated_hosts import EmulatedHosts, unavailable_reason  # noqa: E402

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
FIGURES = re.compile(r"TTFT ([\d.]+) ms \| decode ([\d.]+) tok/s")
COLLECTIVES = re.compile(r"rank 0:.*collectives (\d+) ms over (\w+) \((\d+)% of generation\)")


def run_once(model: str, rate: str | None, prompt_tokens: int, max_tokens: int) -> dict:
    """One tp=2 generate across two hosts shaped at `rate`; rank 0's figures."""
    prompt = " ".join(f"w{3 + i}." for i in range(prompt_tokens))
    args = ["generate", prompt, "--model", model, "--tp", "2", "--max-tokens", str(max_tokens), "--ignore-eos"]
    with EmulatedHosts(2, rate=rate) as hosts:
        nodes = [hosts.popen(h.index, [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                       "--rdzv-endpoint", f"{hosts.hosts[0].addr}:29500", "--rdzv-id", hosts.run_id,
                                       "--max-restarts", "0", "--local-addr", h.addr, "-m", "meshlm.launch", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for h in hosts.hosts]
        results = [n.communicate(timeout=900) for n in nodes]
    if any(n.returncode for n in nodes):
        raise RuntimeError("a node failed:\n" + "\n".join(err[-2000:] for _, err in results))
    err = next(err for _, err in results if FIGURES.search(err))
    ttft, decode = map(float, FIGURES.search(err).groups())
    comm = COLLECTIVES.search(err)
    return {"ttft_ms": ttft, "decode_tok_s": decode, "comm_share": int(comm.group(3)) if comm else None,
            "transport": comm.group(2) if comm else "?"}


def main() -> int:
    """Run every rate, print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-100m", help="a common.MODELS name or a checkpoint path")
    ap.add_argument("--rates", nargs="+", default=["100mbit", "1gbit", "none"], help="tc rates; none = unshaped")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    why = unavailable_reason()
    if why:
        print(f"cannot emulate hosts: {why}", file=sys.stderr)
        return 2
    model = str(common.random_llama(a.model)) if a.model in common.MODELS else a.model
    rows = []
    for rate in a.rates:
        runs = []
        for i in range(a.runs):
            with common.quiet_run(a.wait) as other:
                common.log(f"{rate}: run {i + 1}/{a.runs} (other load {other:.0%})")
                runs.append(run_once(model, None if rate == "none" else rate, a.prompt_tokens, a.max_tokens))
        rows.append({"rate": rate, "ttft_ms": common.median([r["ttft_ms"] for r in runs]),
                     "decode_tok_s": common.median([r["decode_tok_s"] for r in runs]),
                     "comm_share": runs[-1]["comm_share"], "transport": runs[-1]["transport"], "runs": runs})
    print(f"\ntp=2 across two emulated hosts, {a.model}, prompt {a.prompt_tokens} tokens, {a.max_tokens} new; "
          f"{common.machine()}\n")
    print("| link (each way) | TTFT ms | decode tok/s | rank 0 in collectives | transport |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['comm_share']}% | {r['transport']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
