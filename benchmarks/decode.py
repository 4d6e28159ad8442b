"""Batch-1 decode tokens/s: meshlm against Hugging Face transformers `generate`, with the bandwidth roofline.

    python benchmarks/decode.py [--models llama-100m smollm2] [--dtypes float32 bfloat16] [--threads 1 2]
                                [--new-tokens 128] [--runs 3] [--plot docs/img/decode_batch1.png]

Each (model, dtype, threads) runs in a fresh process holding both engines: the same checkpoint, dtype,
intra-op threads and prompt (32 token ids), greedy, 128 new tokens with eos ignored. One warm-up each,
then --runs timed runs alternating meshlm / HF; the table gives medians. Decode tokens/s excludes the
prompt pass on both sides: (new tokens - 1) / (time of the last token - time of the first), from
RequestOutput.decode_s for meshlm and from a streamer's timestamps for HF (its default dynamic cache).
Roofline: every weight is read once per token (the input embedding only one row, a tied head the whole
matrix), so tokens/s <= read bandwidth / weight bytes. Bandwidth is torch.sum over a buffer of exactly the
weights' size on 2 MB pages (as meshlm keeps its packed weights), same threads, best of 10: what the machine
streams for that working set (L3 included).
On a shared machine each timed run takes the benchmarks' lock and waits for other load to drop (common);
a run during which other processes used more than 15% of the CPUs is run again (up to 6 times); "other
load" is the largest share of all CPUs that other processes used during one of a row's kept runs.
Progress goes to stderr; the markdown table to stdout; --json keeps the raw numbers.

On a GPU: python benchmarks/decode.py --device cuda [--models smollm2 llama-400m] [--dtypes bfloat16]
runs both engines on cuda:0 in this process (no CPU load checks) and adds the HBM roofline fraction: weight
bytes per token x tokens/s / peak bandwidth (the card's data-sheet figure, or --peak-gbs), and the same
against the read bandwidth measured there (torch.sum over 1 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

PROMPT_LEN = 32
MAX_OTHER_LOAD = 0.15  # a timed run during which other processes used more of the CPUs is run again
RETRIES = 6


def model_path(name: str) -> Path:
    """Checkpoint folder: a random benchmark Llama, or the bundled SmolLM2-135M-Instruct (dequantized into a
    cached Hugging Face folder, which transformers and meshlm both load)."""
    if name == "smollm2":
        from meshlm.checkpoint.cache import converted_folder, default_gguf_path

        return converted_folder(default_gguf_path(), progress=False)
    return common.random_llama(name)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of parameters one decode step reads: all but the input embedding, unless the head shares it."""
    tied = model.lm_head is not None and model.embed_tokens is not None \
        and model.lm_head.weight is model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if tied or not n.startswith("embed_tokens."))


class ReadBandwidth:
    """Read bandwidth (GB/s) of torch.sum over an fp32 buffer of nbytes with the current threads, on 2 MB pages
    where Linux gives them (as meshlm's packed weights are: 1.6x faster on one core under KVM). The buffer is
    made once, so a reading can be taken beside every timed run (this host's bandwidth changes by minutes)."""

    def __init__(self, nbytes: int) -> None:
        from meshlm.kernels.pages import huge_buffer

        n = max(1, nbytes // 4)
        huge = huge_buffer(4 * n)
        self.buf = huge[:4 * n].view(torch.float32).fill_(1.0) if huge is not None else torch.ones(n)

    def __call__(self, tries: int = 10) -> float:
        """The best of `tries` passes."""
        best = 0.0
        for _ in range(tries):
            t0 = time.perf_counter()
            self.buf.sum()
            best = max(best, self.buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        return best


def read_bandwidth(nbytes: int, tries: int = 10) -> float:
    """Best read bandwidth (GB/s) of torch.sum over nbytes (ReadBandwidth, one reading)."""
    return ReadBandwidth(nbytes)(tries)


READ_TRIES = 5  # torch.sum passes per reading beside a timed run (the best is kept)


def runs_beside_bandwidth(llm, prompts, params, runs: int, wait_s: float, timed=None) -> tuple[list, list[float]]:
    """`runs` timed llm.generate calls, each with the read bandwidth taken just before and just after it (a
    ReadBandwidth of the model's weight bytes per token): (each call's result, each call's mean reading).
    timed(fn, *args) wraps the call (e.g. timed_with_load); plain generate when None."""
    read = ReadBandwidth(weight_bytes_per_token(llm.model))
    outs, bws = [], []
    for _ in range(runs):
        with common.quiet_run(wait_s):
            before = read(READ_TRIES)
            outs.append(timed(llm.generate, prompts, params) if timed else llm.generate(prompts, params))
            bws.append((before + read(READ_TRIES)) / 2)
    return outs, bws


def roofline_share(tps: list[float], bws: list[float], wbytes: int) -> float:
    """Median share of the roofline over runs, each run's tokens/s against the bandwidth read beside it."""
    return common.median([t * wbytes / (b * 1e9) for t, b in zip(tps, bws)])


def _jiffies() -> tuple[int, int]:
    """System-wide (busy, total) CPU jiffies from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def timed_with_load(fn, *args):
    """(fn(*args), share of all CPUs that other processes used while it ran)."""
    hz = os.sysconf("SC_CLK_TCK")
    b0, t0 = _jiffies()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    out = fn(*args)
    b1, t1 = _jiffies()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ours = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * hz
    return out, max(0.0, (b1 - b0 - ours) / max(1, t1 - t0))


class Stamps:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        """The first call carries the prompt; each later one a new token."""
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        """Nothing to flush."""


def hf_decode(model, ids: list[int], new: int) -> tuple[float, list[int]]:
    """HF greedy generate; (decode tokens/s after the first token, generated ids)."""
    from transformers import GenerationConfig

    stamps = Stamps()
    x = torch.tensor([ids], device=model.device)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():  # eos_token_id=None: never stop early, like meshlm's ignore_eos
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg, streamer=stamps)
    t = stamps.times
    return (len(t) - 1) / (t[-1] - t[0]), out[0, len(ids):].tolist()


def meshlm_decode(llm, ids: list[int], new: int) -> tuple[float, list[int]]:
    """meshlm greedy generate; (decode tokens/s after the first token, generated ids)."""
    from meshlm import SamplingParams

    out = llm.generate([ids], SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))[0]
    return out.decode_tokens_per_s, out.token_ids


def run_one(name: str, dtype: str, threads: int, new: int, runs: int, wait_s: float) -> dict:
    """Both engines on one (model, dtype, threads) in this process; a result row."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig
    from meshlm.threads import set_threads

    hf_logging.disable_progress_bar()
    set_threads(threads)
    path = model_path(name)
    common.log(f"{name} {dtype} threads={threads}: loading both engines")
    llm = LLM(str(path), dtype=dtype, threads=threads, progress=False, engine=EngineConfig(kv_cache_mb=64))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    ids = common.prompt_ids(PROMPT_LEN, llm.cfg.vocab_size)
    wbytes = weight_bytes_per_token(llm.model)
    meshlm_decode(llm, ids, 16)  # warm-up (the first bf16 call also builds or loads the GEMV kernel)
    hf_decode(hf, ids, 16)
    ours, theirs, busy = [], [], []
    for i in range(runs):
        for engine, fn, model, acc in (("meshlm", meshlm_decode, llm, ours), ("hf", hf_decode, hf, theirs)):
            for attempt in range(RETRIES + 1):  # a run that other processes disturbed is run again
                with common.quiet_run(wait_s):
                    (tps, toks), load = timed_with_load(fn, model, ids, new)
                if load <= MAX_OTHER_LOAD:
                    break
                common.log(f"  run {i + 1}/{runs} {engine}: other load {load:.0%}, again ({attempt + 1}/{RETRIES})")
            busy.append(load)
            acc.append((tps, toks))
            common.log(f"  run {i + 1}/{runs} {engine}: {tps:.1f} tok/s (other load during the run {load:.0%})")
    with common.quiet_run(wait_s):
        bw = read_bandwidth(wbytes)
        dram = read_bandwidth(1 << 30, tries=4)
    llm.close()
    same = next((j for j, (a, b) in enumerate(zip(ours[0][1], theirs[0][1])) if a != b), None)
    row = dict(model=name, dtype=dtype, threads=threads, weight_mb=wbytes / 1e6, bw_gbs=bw, dram_gbs=dram,
               meshlm=common.median([t for t, _ in ours]), hf=common.median([t for t, _ in theirs]),
               meshlm_runs=[t for t, _ in ours], hf_runs=[t for t, _ in theirs], max_other_load=max(busy),
               first_diff=same, new_tokens=new, runs=runs)
    row["roofline"] = bw * 1e9 / wbytes
    common.log(f"  -> meshlm {row['meshlm']:.1f}  hf {row['hf']:.1f}  roofline {row['roofline']:.1f} tok/s")
    return row


# Data-sheet HBM bandwidth (GB/s) by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_GBS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("A100-SXM4-80GB", 2039),
            ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("A10G", 600), ("L4", 300)]


def gpu_read_bandwidth(device: torch.device, nbytes: int = 1 << 30, tries: int = 10) -> float:
    """Best read bandwidth (GB/s) of torch.sum over an fp32 buffer of nbytes on the device (CUDA events)."""
    buf = torch.ones(nbytes // 4, device=device)
    best = 0.0
    for _ in range(tries):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            buf.sum()
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            buf.sum()
            seconds = time.perf_counter() - t0
        best = max(best, nbytes / seconds / 1e9)
    return best


def run_on_device(name: str, dtype: str, new: int, runs: int, device: str = "cuda",
                  peak_gbs: float | None = None) -> dict:
    """meshlm and HF on one device (cuda:0) for one (model, dtype): tok/s medians and roofline fractions."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig

    hf_logging.disable_progress_bar()
    path = model_path(name)
    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else common.machine().split(",")[0]
    peak = peak_gbs or next((gbs for key, gbs in PEAK_GBS if key in card), None) if dev.type == "cuda" \
        else peak_gbs
    common.log(f"{name} {dtype} on {card}: loading both engines")
    llm = LLM(str(path), dtype=dtype, device=device, progress=False, engine=EngineConfig(kv_cache_mb=256))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(dev).eval()
    ids = common.prompt_ids(PROMPT_LEN, llm.cfg.vocab_size)
    wbytes = weight_bytes_per_token(llm.model)
    meshlm_decode(llm, ids, 16)  # warm-up
    hf_decode(hf, ids, 16)
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(meshlm_decode(llm, ids, new))
        theirs.append(hf_decode(hf, ids, new))
    measured = gpu_read_bandwidth(dev)
    llm.close()
    same = next((j for j, (a, b) in enumerate(zip(ours[0][1], theirs[0][1])) if a != b), None)
    row = dict(model=name, dtype=dtype, device=card, weight_mb=wbytes / 1e6, new_tokens=new, runs=runs,
               meshlm=common.median([t for t, _ in ours]), hf=common.median([t for t, _ in theirs]),
               peak_gbs=peak, measured_gbs=measured, first_diff=same)
    for engine in ("meshlm", "hf"):
        gbs = row[engine] * wbytes / 1e9  # weight bytes streamed per second at that token rate
        row[f"{engine}_of_peak"] = gbs / peak if peak else None
        row[f"{engine}_of_measured"] = gbs / measured
    common.log(f"  -> meshlm {row['meshlm']:.1f}  hf {row['hf']:.1f} tok/s; meshlm streams "
               f"{row['meshlm'] * wbytes / 1e9:.0f} GB/s of weights (peak {peak or '?'}, measured {measured:.0f})")
    return row


def device_table(rows: list[dict]) -> str:
    """Markdown table of run_on_device rows."""
    pct = lambda x: "?" if x is None else f"{x:.0%}"
    head = ("| model | dtype | device | weights MB/token | HF tok/s | meshlm tok/s | meshlm % of peak HBM | "
            "HF % of peak HBM | meshlm % of measured read BW | greedy tokens |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    return head + "\n".join(
        f"| {r['model']} | {r['dtype']} | {r['device']} | {r['weight_mb']:.0f} | {r['hf']:.1f} | {r['meshlm']:.1f} | "
        f"{pct(r['meshlm_of_peak'])} | {pct(r['hf_of_peak'])} | {pct(r['meshlm_of_measured'])} | "
        f"{'identical' if r['first_diff'] is None else 'differ from #' + str(r['first_diff'])} |" for r in rows)


def table(rows: list[dict]) -> str:
    """Markdown table of result rows."""
    head = ("| model | dtype | threads | weights MB/token | read GB/s | roofline tok/s | HF tok/s | "
            "meshlm tok/s | meshlm / HF | HF % roofline | meshlm % roofline | greedy tokens | other load |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n")
    lines = []
    for r in rows:
        same = "identical" if r["first_diff"] is None else f"differ from #{r['first_diff']}"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['threads']} | {r['weight_mb']:.0f} | {r['bw_gbs']:.1f} | "
            f"{r['roofline']:.1f} | {r['hf']:.1f} | {r['meshlm']:.1f} | {r['meshlm'] / r['hf']:.2f}x | "
            f"{r['hf'] / r['roofline']:.0%} | {r['meshlm'] / r['roofline']:.0%} | {same} | "
            f"{r['max_other_load']:.0%} |")
    return head + "\n".join(lines)


def peer_bars(rows: list[dict], path: str, peer: str, peer_label: str, labels: list[str], title: str) -> None:
    """Grouped bars (the peer's rows[peer], meshlm, roofline) per row, meshlm/peer over meshlm's, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    w = 0.28
    ax.bar([i - w for i in x], [r[peer] for r in rows], w, label=peer_label)
    ax.bar(list(x), [r["meshlm"] for r in rows], w, label="meshlm")
    ax.bar([i + w for i in x], [r["roofline"] for r in rows], w, label="bandwidth roofline",
           color="lightgray", edgecolor="gray", hatch="//")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['meshlm'] / r[peer]:.2f}x", (i, r["meshlm"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title + common.machine().split(",")[0], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    common.log(f"wrote {path}")


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars (HF, meshlm, roofline) per configuration, saved as a PNG."""
    peer_bars(rows, path, "hf", "HF transformers generate",
              [f"{r['model']}\n{r['dtype']}\n{r['threads']} thr" for r in rows], "Batch-1 decode on ")


def main() -> None:
    """Run every configuration in its own process, then print the table and draw the chart."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama-100m", "smollm2"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for other CPU load to drop")
    ap.add_argument("--plot", default="docs/img/decode_batch1.png")
    ap.add_argument("--json", default=None, help="also write the raw rows here (after every row)")
    ap.add_argument("--report", default=None, help="only print the table and draw the chart of a --json file")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: both engines on cuda:0 in this process, with the HBM roofline fraction")
    ap.add_argument("--peak-gbs", type=float, default=None, help="the GPU's peak memory bandwidth (GB/s)")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "DTYPE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda":
        rows = [run_on_device(name, dtype, args.new_tokens, args.runs, "cuda", args.peak_gbs)
                for name in args.models for dtype in args.dtypes]
        print(device_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    if args.one:
        name, dtype, threads = args.one
        print(json.dumps(run_one(name, dtype, int(threads), args.new_tokens, args.runs, args.wait)))
        return
    if args.report:
        report(json.loads(Path(args.report).read_text()), args)
        return
    common.log(common.machine())
    for name in args.models:
        model_path(name)  # build or convert once, before the timed processes start
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            for threads in args.threads:
                cmd = [sys.executable, __file__, "--one", name, dtype, str(threads), "--new-tokens",
                       str(args.new_tokens), "--runs", str(args.runs), "--wait", str(args.wait)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                if args.json:  # after every row, so an interrupted run keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    """The markdown table on stdout and the chart."""
    args.new_tokens, args.runs = rows[0]["new_tokens"], rows[0].get("runs", args.runs)
    print(f"{common.machine()}; {args.new_tokens} new tokens after a {PROMPT_LEN}-token prompt, batch 1, "
          f"median of {args.runs}\n")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
