"""Batch-1 decode tokens/s on the same GGUF files: meshlm against llama.cpp's llama-bench, with the roofline.

    python benchmarks/decode_gguf.py --llama-bin DIR [--formats F32 BF16 Q8_0 Q4_0 Q4_1] [--threads 1 2]
                                     [--new 64] [--runs 3] [--rounds 2] [--json out.json]
                                     [--plot docs/img/decode_gguf.png]

The weights: the bundled SmolLM2-135M-Instruct Q4_1 GGUF, and the same file requantized by llama.cpp's own
`llama-quantize --allow-requantize` to F32, BF16, Q8_0 and Q4_0 (made once into ~/.cache/meshlm/bench/gguf).
Both engines read each file as it is: meshlm keeps its precision (the default `--dtype auto`).
llama.cpp: `llama-bench -m FILE -p 0 -n NEW -t T -r RUNS -o json` (tg: NEW tokens after an empty prompt).
meshlm: a fresh process per (format, threads, round): one warm-up, then RUNS greedy runs of NEW + 1 tokens
after a 1-token prompt; decode tokens/s excludes the first token (RequestOutput.decode_tokens_per_s).
Each round runs both engines back to back, the order alternating between rounds; tables give medians.
Roofline: every weight byte is read once per token (the input embedding only a row; a tied head reads the
whole table), so tokens/s <= read bandwidth / weight bytes; the bandwidth is torch.sum over a buffer of that
size on 2 MB pages (as meshlm keeps its weights) with the same threads, best of decode.READ_TRIES passes, read just
before and just after every timed run (llama-bench's call of RUNS runs; meshlm's each run), because this
host's bandwidth moves between two levels by the minute at two threads. A run's share of the roofline is
its tokens/s x weight bytes over the mean of its two readings; the tables give the median share, the median
reading and their range. Each timed run holds the benchmarks' lock and waits for the machine to quieten
(common.quiet_run); "other load" is the largest share of the CPUs other processes used during one of
meshlm's kept runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import common

FORMATS = ["F32", "BF16", "Q8_0", "Q4_0", "Q4_1"]
GGUF_DIR = common.CACHE / "gguf"


def gguf_file(fmt: str, bin_dir: Path) -> Path:
    """The bundled model in `fmt`: the shipped Q4_1 file, or llama-quantize's requantization of it."""
    from meshlm.checkpoint.cache import default_gguf_path

    src = default_gguf_path()
    if fmt == "Q4_1":
        return src
    out = GGUF_DIR / f"{src.stem.rsplit('.', 1)[0]}.{fmt}.gguf"
    if not out.exists():
        GGUF_DIR.mkdir(parents=True, exist_ok=True)
        common.log(f"requantizing {src.name} to {fmt} with llama-quantize")
        tmp = out.with_suffix(".tmp")
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(tmp), fmt, "1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(out)
    return out


def meshlm_runs(path: str, threads: int, new: int, runs: int, wait_s: float) -> dict:
    """In this process: meshlm on one file and thread count; tok/s per run, weight bytes, read bandwidth."""
    import decode

    from meshlm import LLM, SamplingParams
    from meshlm.engine.engine import EngineConfig

    llm = LLM(path, threads=threads, progress=False, engine=EngineConfig(kv_cache_mb=64))
    bos = llm.cfg.bos_token_id if llm.cfg.bos_token_id is not None else 1
    params = SamplingParams(max_tokens=new + 1, temperature=0.0, ignore_eos=True)
    llm.generate([[bos]], params)  # warm-up (also builds or loads the kernels)
    timed, bws = decode.runs_beside_bandwidth(llm, [[bos]], params, runs, wait_s, decode.timed_with_load)
    wbytes = decode.weight_bytes_per_token(llm.model)
    llm.close()
    return dict(tps=[out[0].decode_tokens_per_s for out, _ in timed], bw=bws, load=max(ld for _, ld in timed),
                weight_bytes=wbytes)


def llama_runs(bin_dir: Path, path: Path, threads: int, new: int, runs: int, wait_s: float,
               read) -> tuple[list[float], list[float]]:
    """llama-bench tg tokens/s of each run, and the read bandwidth beside each (read before and after the call)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-p", "0", "-n", str(new), "-t", str(threads),
           "-r", str(runs), "-o", "json"]
    import decode

    with common.quiet_run(wait_s):
        before = read(decode.READ_TRIES)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        bw = (before + read(decode.READ_TRIES)) / 2
    tps = [float(x) for x in json.loads(out)[0]["samples_ts"]]
    return tps, [bw] * len(tps)


def measure(fmt: str, threads: int, args: argparse.Namespace) -> dict:
    """Both engines on one (format, threads): rounds of back-to-back runs, order alternating (meshlm first in
    the first round, whose process reports the weight bytes the bandwidth readings need)."""
    import decode
    import torch

    path = gguf_file(fmt, args.llama_bin)
    ours, theirs, our_bw, their_bw, loads, wbytes, read = [], [], [], [], [], 0, None
    torch.set_num_threads(threads)  # this process reads the bandwidth beside llama-bench with its threads
    for r in range(args.rounds):
        for engine in (("meshlm", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "meshlm")):
            if engine == "llama.cpp":
                read = read or decode.ReadBandwidth(wbytes)
                got, bws = llama_runs(args.llama_bin, path, threads, args.new, args.runs, args.wait, read)
                theirs += got
                their_bw += bws
            else:
                cmd = [sys.executable, __file__, "--one", str(path), str(threads), "--new", str(args.new),
                       "--runs", str(args.runs), "--wait", str(args.wait)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                facts = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                                                  env=env).stdout.strip().splitlines()[-1])
                got, bws, wbytes = facts["tps"], facts["bw"], facts["weight_bytes"]
                ours += got
                our_bw += bws
                loads.append(facts["load"])
            common.log(f"  {fmt} t={threads} round {r + 1} {engine}: " + " ".join(f"{x:.1f}" for x in got)
                       + "  (read GB/s " + " ".join(f"{b:.1f}" for b in bws) + ")")
    del read
    bw_all = our_bw + their_bw
    bw = common.median(bw_all)
    row = dict(format=fmt, threads=threads, file=path.name, weight_mb=wbytes / 1e6, bw_gbs=bw,
               bw_min=min(bw_all), bw_max=max(bw_all), roofline=bw * 1e9 / wbytes,
               meshlm=common.median(ours), llama=common.median(theirs),
               meshlm_share=decode.roofline_share(ours, our_bw, wbytes),
               llama_share=decode.roofline_share(theirs, their_bw, wbytes),
               meshlm_runs=ours, llama_runs=theirs, meshlm_bw=our_bw, llama_bw=their_bw,
               max_other_load=max(loads), new=args.new)
    common.log(f"  -> {fmt} t={threads}: meshlm {row['meshlm']:.1f}  llama.cpp {row['llama']:.1f}  "
               f"roofline {row['roofline']:.1f} tok/s; shares {row['meshlm_share']:.0%} / {row['llama_share']:.0%}")
    return row


def table(rows: list[dict]) -> str:
    """Markdown table of result rows."""
    head = ("| format | threads | weights MB/token | read GB/s (range) | roofline tok/s | llama.cpp tok/s | "
            "meshlm tok/s | meshlm / llama.cpp | llama.cpp % roofline | meshlm % roofline | other load |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['format']} | {r['threads']} | {r['weight_mb']:.0f} | "
        f"{r['bw_gbs']:.1f} ({r['bw_min']:.0f}-{r['bw_max']:.0f}) | {r['roofline']:.0f} | {r['llama']:.1f} | "
        f"{r['meshlm']:.1f} | {r['meshlm'] / r['llama']:.2f}x | "
        f"{r['llama_share']:.0%} | {r['meshlm_share']:.0%} | {r['max_other_load']:.0%} |" for r in rows)


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars (llama.cpp, meshlm, roofline) per (format, threads), saved as a PNG."""
    import decode

    decode.peer_bars(rows, path, "llama", "llama.cpp (llama-bench)",
                     [f"{r['format']}\n{r['threads']} thr" for r in rows], "SmolLM2-135M GGUF, batch-1 decode on ")


def main() -> None:
    """Measure every (format, threads), then print the table and draw the chart."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("MESHLM_LLAMA_BIN"),
                    help="folder with llama-bench and llama-quantize (or $MESHLM_LLAMA_BIN)")
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for other CPU load to drop")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="docs/img/decode_gguf.png")
    ap.add_argument("--one", nargs=2, metavar=("FILE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(meshlm_runs(args.one[0], int(args.one[1]), args.new, args.runs, args.wait)))
        return
    if args.llama_bin is None or not (args.llama_bin / "llama-bench").exists():
        sys.exit("llama.cpp binaries not found: pass --llama-bin DIR (or set MESHLM_LLAMA_BIN) with llama-bench and "
                 "llama-quantize, built from the llama-cpp-python sdist (see docs/benchmarks.md).")
    common.log(common.machine())
    rows = []
    for fmt in args.formats:
        for threads in args.threads:
            rows.append(measure(fmt, threads, args))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{common.machine()}; batch 1, {args.new} new tokens, median of {args.runs * args.rounds} runs per engine\n")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
