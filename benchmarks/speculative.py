"""Speculative decoding on the default model: batch-1 decode tokens/s with and without each proposer, their
acceptance, and throughput at 16 and 64 concurrent requests with the policy on and off; beside each batch-1
row, the step-cost arithmetic that explains its speedup.

    python benchmarks/speculative.py [--layouts tp1 pp2] [--proposers ngram draft self-int4] [--k 4]
                                     [--new 128] [--runs 2] [--json out.json] [--plot docs/img/speculative.png]
    python benchmarks/speculative.py --quick      # smoke run: one prompt per task, 8 tokens, 2 requests
    python benchmarks/speculative.py --report out.json [--plot ...]   # the tables of a saved run again

Target: SmolLM2-135M-Instruct, the bundled GGUF's weights dequantized to float32 (--target float32, the
default), or the bundled Q4_1 file as `meshlm generate` runs it (--target gguf; self-int4 then drafts with
that same file, so a draft step costs a target step and the script says so). Proposers: ngram (prompt
lookup); self-int4 (the target's weights quantized to Q4_0 at load); draft (--draft PATH). SmolLM2-135M is
the smallest model with this tokenizer and no other is at hand offline, so the default draft is the bundled
Q4_1 GGUF of the same model drafting for the float32 target: through the draft:PATH entry point it is the
self-draft case again, not a smaller model. --draft first:N drafts with the target's first N layers (with its
final norm and tied head), a same-tokenizer draft that is smaller but was never trained to draft: its
proposals are almost never accepted (the table shows what that costs).
Tasks: "grounded" edits or summarises an excerpt of meshlm/data/alice.txt given in the prompt (the answer
repeats its words: n-gram lookup finds them); "chat" answers open questions (nothing to look up).
Every (layout, proposer, policy) runs in a fresh process. Batch-1: each prompt alone, greedy, --new tokens
with eos ignored; decode tokens/s = (tokens - 1) / decode seconds (RequestOutput.decode_s, the prompt pass
excluded), pooled over the task's prompts, median of --runs. Speculation is exact (greedy outputs equal the
baseline's; the script checks it). Throughput: 16 and 64 requests at once (grounded and chat prompts in
turn), generated tokens / wall seconds of generate(), policy on (the default: speculate while the measured
step cost says it pays) and off (always k). Each timed run holds the benchmarks' run lock and starts on a
quiet machine (common.quiet_run). Progress goes to stderr, the markdown tables to stdout.
$MESHLM_SPEC_LOG=PREFIX: each child writes the policy's decision log (meshlm.engine.spec_policy at DEBUG: the
fitted costs and predicted tokens/s with and without speculation, every step) to PREFIX.<job name>.log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import common

TASKS = ("grounded", "chat")
CHAT = ("Write a short story about a robot who learns to paint.",
        "What are three good habits for staying healthy? Explain each.",
        "Describe a busy market in a small town on a summer morning.",
        "Why is the sky blue? Explain it to a ten-year-old.")
EDIT = "Copy the passage above, correcting any spelling mistakes and keeping every sentence."
SUMMARY = "Summarise the passage above in a few sentences, using its own words."
CONCURRENCY = (16, 64)
PROPOSERS = ("ngram", "draft", "self-int4")
LAYOUTS = {"tp1": {"tp": 1, "pp": 1}, "pp2": {"tp": 1, "pp": 2}}


def excerpts(n: int, chars: int = 1200) -> list[str]:
    """n paragraph-aligned excerpts of about `chars` characters of meshlm/data/alice.txt, spread over it."""
    text = (Path(__file__).parents[1] / "meshlm" / "data" / "alice.txt").read_text()
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    out = []
    for i in range(n):
        at, ex = i * len(paras) // n, ""
        while len(ex) < chars and at < len(paras):
            ex, at = ex + paras[at] + "\n\n", at + 1
        out.append(ex.strip())
    return out


def task_prompts(llm, task: str, n: int, tag: str = "") -> list[list[int]]:
    """n distinct chat prompts (token ids) of a task, each starting with `(tag) ` when a tag is given (so a
    run's prompts share no prefix with another run's)."""
    if task == "chat":
        texts = [CHAT[i] if i < len(CHAT) else f"Question {i}: {CHAT[i % len(CHAT)]}" for i in range(n)]
    else:
        texts = [f"{ex}\n\n{EDIT if i % 2 == 0 else SUMMARY}" for i, ex in enumerate(excerpts(n))]
    return [llm.encode_prompt([{"role": "user", "content": f"({tag}) {t}" if tag else t}]) for t in texts]


def mixed_prompts(llm, n: int, tag: str = "") -> list[list[int]]:
    """n distinct prompts, grounded and chat in turn (the throughput runs' load)."""
    many = {t: task_prompts(llm, t, -(-n // 2), tag) for t in TASKS}
    return [many[TASKS[i % 2]][i // 2] for i in range(n)]


def draft_checkpoint(target: Path, layers: int) -> Path:
    """The target's first `layers` decoder layers with its final norm and tied head, as a float32 folder in the
    benchmark cache: a same-tokenizer draft made from the target (untrained as a draft: see the docstring)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = common.CACHE / f"{target.name}-first{layers}"
    if (path / "DONE").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        keep = {k: f.get_tensor(k) for k in f.keys()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((target / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(target / name, path / name)
    (path / "DONE").write_text("")
    return path


def target_path(kind: str) -> str:
    """The bundled SmolLM2: its GGUF as is (gguf) or dequantized into a float32 folder (float32)."""
    from meshlm.checkpoint.cache import converted_folder, default_gguf_path

    return str(default_gguf_path() if kind == "gguf" else converted_folder(default_gguf_path(), progress=False))


def open_llm(job: dict, adaptive: bool):
    """The job's LLM: its layout, and speculation with its proposer (None: none)."""
    from meshlm import LLM
    from meshlm.engine.engine import EngineConfig
    from meshlm.engine.speculative import SpeculativeConfig

    method = {"draft": f"draft:{job['draft']}"}.get(job["proposer"], job["proposer"])
    spec = None if method == "none" else SpeculativeConfig(method, num_tokens=job["k"], adaptive=adaptive)
    return LLM(job["target"], threads=job["threads"], progress=False, **LAYOUTS[job["layout"]],
               engine=EngineConfig(kv_cache_mb=job["kv_mb"]), speculative=spec)


def counters(llm) -> dict:
    """The engine's speculative totals so far (zeros without speculation)."""
    c = llm.engine.stats().speculative
    return {"drafts": c.drafts, "proposed": c.proposed, "accepted": c.accepted,
            "proposed_at": list(c.proposed_at), "accepted_at": list(c.accepted_at)} if c is not None else \
        {"drafts": 0, "proposed": 0, "accepted": 0, "proposed_at": [], "accepted_at": []}


def delta(after: dict, before: dict) -> dict:
    """Counter differences (per-position lists padded to the longer)."""
    out = {k: after[k] - before[k] for k in ("drafts", "proposed", "accepted")}
    for k in ("proposed_at", "accepted_at"):
        b = before[k] + [0] * (len(after[k]) - len(before[k]))
        out[k] = [x - y for x, y in zip(after[k], b)]
    return out


class ProposerClock:
    """Wraps the engine's proposer to add up the seconds its propose() takes (rank 0's process); first_s: of
    those, the calls that brought a new request (a draft model's catch-up on the whole prompt)."""

    def __init__(self, llm) -> None:
        self.seconds = self.first_s = 0.0
        self.seen: set[str] = set()
        spec = llm.engine.spec
        self.inner = spec.proposer if spec is not None else None
        if self.inner is not None:
            spec.proposer = self

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, reqs, ks):
        """The wrapped propose(), timed."""
        t0 = time.perf_counter()
        new = any(r.id not in self.seen for r in reqs)
        self.seen.update(r.id for r in reqs)
        try:
            return self.inner.propose(reqs, ks)
        finally:
            self.seconds += time.perf_counter() - t0
            self.first_s += (time.perf_counter() - t0) * new


def batch1(llm, prompts: list[list[int]], new: int, clock: ProposerClock) -> dict:
    """Each prompt alone: pooled decode tokens/s, decode steps, proposer seconds and speculative counters."""
    from meshlm import SamplingParams

    c0, p0, f0 = counters(llm), clock.seconds, clock.first_s
    tokens = seconds = 0.0
    outs = []
    for ids in prompts:
        out = llm.generate([ids], SamplingParams(max_tokens=new, ignore_eos=True))[0]
        outs.append(out.token_ids)
        tokens += len(out.token_ids) - 1
        seconds += out.decode_s
    c = delta(counters(llm), c0)
    steps = tokens - c["accepted"]  # every decode step emits one token plus the proposals it accepted
    return {"tps": tokens / seconds, "decode_s": seconds, "tokens": tokens, "steps": steps,
            "propose_s": clock.seconds - p0, "first_propose_s": clock.first_s - f0, "spec": c, "outputs": outs}


def throughput(llm, prompts: list[list[int]], new: int) -> dict:
    """All prompts at once: generated tokens per wall second."""
    from meshlm import SamplingParams

    c0 = counters(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    dt = time.perf_counter() - t0
    return {"tps": sum(len(o.token_ids) for o in outs) / dt, "spec": delta(counters(llm), c0)}


def median_of(runs: int, wait: float, fn, key: str = "tps") -> dict:
    """The median (by key) of `runs` calls, each holding the run lock on a quiet machine; other load kept."""
    res = []
    for _ in range(runs):
        with common.quiet_run(wait), common.other_load() as other:
            r = fn()
        res.append({**r, "other": other[0]})
    return sorted(res, key=lambda x: x[key])[len(res) // 2]


def measure(job: dict) -> dict:
    """One (layout, proposer, policy) in this process: batch 1 on job["tasks"], then throughput at each
    job["concurrency"]. Each request's acceptance starts from the engine-wide estimate, so a proposer's batch-1
    task runs in its own process (a task it fails at would otherwise lower the next task's starting estimate)."""
    from meshlm import SamplingParams

    out: dict = {"batch1": {}, "throughput": {}}
    with open_llm(job, job["adaptive"]) as llm:
        clock = ProposerClock(llm)
        prompts = {t: task_prompts(llm, t, job["prompts"]) for t in TASKS}
        warm = prompts[(job["tasks"] or ["chat"])[0]][0]
        llm.generate([warm], SamplingParams(max_tokens=16, ignore_eos=True))  # warm-up
        if llm.engine.spec is not None:  # the measured runs start from the policy's prior, as a new engine does
            from meshlm.engine.spec_policy import SpecPolicy

            llm.engine.spec.policy = SpecPolicy(llm.engine.spec.cfg.num_tokens, llm.engine.spec.cfg.adaptive)
        if job["tasks"]:
            for t in job["tasks"]:
                out["batch1"][t] = median_of(job["runs"], job["wait"],
                                             lambda t=t: batch1(llm, prompts[t], job["new"], clock))
                common.log(f"  {job['name']} {t}: {out['batch1'][t]['tps']:.1f} tok/s")
        for n in job["concurrency"]:
            mixed = mixed_prompts(llm, n)
            out["throughput"][n] = median_of(job["runs"], job["wait"],
                                             lambda m=mixed: throughput(llm, m, job["tp_new"]))
            common.log(f"  {job['name']} n={n}: {out['throughput'][n]['tps']:.1f} tok/s")
    return out


def run_child(job: dict) -> dict:
    """measure() in a fresh interpreter; its last stdout line is the JSON result."""
    common.log(job["name"])
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification emits when each of k proposals is accepted with probability alpha given the
    ones before it were (Leviathan et al. 2023): 1 + alpha + ... + alpha^k."""
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def step_cost_speedup(tokens_per_step: float, draft_cost: float, verify_cost: float) -> float:
    """Decode speedup over no speculation: tokens per step over a step's cost, costs in units of one plain
    (one-token) target step: draft_cost = the proposer's seconds per step, verify_cost = the target step that
    scores the proposals. Batch 1 is bound by streaming the weights, so verify_cost stays near 1 while
    tokens_per_step grows; the proposer's cost is what a fast draft must keep small."""
    return tokens_per_step / (draft_cost + verify_cost)


def arithmetic(row: dict, base: dict, k: int) -> dict:
    """The step-cost decomposition of a batch-1 row against the baseline row (same layout and task)."""
    plain = base["decode_s"] / base["steps"]  # seconds of one plain target decode step
    steps = row["steps"]
    draft = row["propose_s"] / steps / plain
    verify = (row["decode_s"] - row["propose_s"]) / steps / plain
    per_step = row["tokens"] / steps
    spec = row["spec"]
    alpha = spec["accepted"] / spec["proposed"] if spec["proposed"] else 0.0
    # tokens per step a 2x speedup needs at these costs, and the per-token acceptance that gives it with k
    need = 2 * (draft + verify)
    need_alpha = next((a / 100 for a in range(101) if expected_tokens(a / 100, k) >= need), None)
    return {"plain_ms": plain * 1e3, "draft": draft, "verify": verify, "tokens_per_step": per_step,
            "catch_up": row["first_propose_s"] / steps / plain,
            "alpha": alpha, "predicted": step_cost_speedup(per_step, draft, verify),
            "iid_tokens": expected_tokens(alpha, k), "need_tokens_2x": need, "need_alpha_2x": need_alpha}


def tables(res: dict, args) -> str:
    """Markdown: batch-1 rows with their arithmetic, then throughput with the policy on and off."""
    lines = ["| Layout | Task | Proposer | tok/s | Speedup | Acceptance | Mean accepted length | Tokens / step "
             "| Draft cost (prompt catch-up) | Verify cost | Step-cost speedup "
             "| Needed for 2x: tokens / step (alpha at k) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lay in args.layouts:
        base = res[f"{lay} none"]["batch1"]
        for task in TASKS:
            b = base[task]
            lines.append(f"| {lay} | {task} | none | {b['tps']:.1f} | 1.00x | | | 1.00 | | 1.00 | | |")
            for p in args.proposers:
                r = res[f"{lay} {p} policy-on"]["batch1"][task]
                a = arithmetic(r, b, args.k)
                s = r["spec"]
                mal = 1 + s["accepted"] / s["drafts"] if s["drafts"] else 0.0
                na = "unreachable" if a["need_alpha_2x"] is None else f"{a['need_alpha_2x']:.2f}"
                lines.append(f"| {lay} | {task} | {p} | {r['tps']:.1f} | {r['tps'] / b['tps']:.2f}x | {a['alpha']:.0%} "
                             f"| {mal:.2f} | {a['tokens_per_step']:.2f} | {a['draft']:.2f} ({a['catch_up']:.2f}) "
                             f"| {a['verify']:.2f} | {a['predicted']:.2f}x | {a['need_tokens_2x']:.2f} ({na}) |")
    lines += ["", "| Layout | Requests | none tok/s | " + " | ".join(f"{p} policy on | {p} policy off"
                                                               for p in args.proposers) + " |",
              "|---|---:|---:|" + "---:|---:|" * len(args.proposers)]
    for lay in args.layouts:
        for n in args.concurrency:
            base = res[f"{lay} none"]["throughput"][str(n)]["tps"]
            cells = []
            for p in args.proposers:
                for pol in ("on", "off"):
                    t = res[f"{lay} {p} policy-{pol}"]["throughput"][str(n)]["tps"]
                    cells.append(f"{t:.1f} ({t / base:.2f}x)")
            lines.append(f"| {lay} | {n} | {base:.1f} | " + " | ".join(cells) + " |")
    others = [x["other"] for r in res.values() for part in ("batch1", "throughput") for x in r[part].values()]
    lines += ["", "Costs are in units of one plain target decode step (batch 1, same layout and task). Draft cost: "
              "the proposer's seconds per decode step (in brackets: the share of its first call per request, a draft "
              "model's pass over the prompt); verify cost: the target step that scores the proposals; "
              "step-cost speedup = tokens per step / (draft + verify), the same figure as the measured one "
              "(a check on the decomposition). Needed for 2x: the tokens per step 2x takes at these costs, and "
              "the per-token acceptance alpha that gives them with k proposals (1 + alpha + ... + alpha^k).",
              f"CPU share taken by other processes during the reported runs: median {common.median(others):.0%}, "
              f"max {max(others):.0%}." if others else ""]
    return "\n".join(lines)


def check_exact(res: dict, args) -> list[str]:
    """Batch-1 greedy outputs of every proposer must equal the baseline's (speculation is exact)."""
    bad = []
    for lay in args.layouts:
        for task in TASKS:
            want = res[f"{lay} none"]["batch1"][task]["outputs"]
            for p in args.proposers:
                if res[f"{lay} {p} policy-on"]["batch1"][task]["outputs"] != want:
                    bad.append(f"{lay} {task} {p}")
    return bad


def plot(res: dict, args, path: Path) -> None:
    """Bars: batch-1 speedup of each proposer per layout and task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(lay, t) for lay in args.layouts for t in TASKS]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(args.proposers)
    for i, p in enumerate(args.proposers):
        ys = [res[f"{lay} {p} policy-on"]["batch1"][t]["tps"] / res[f"{lay} none"]["batch1"][t]["tps"]
              for lay, t in groups]
        ax.bar([g + i * width for g in range(len(groups))], ys, width, label=p)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([g + width * (len(args.proposers) - 1) / 2 for g in range(len(groups))],
                  [f"{lay}\n{t}" for lay, t in groups])
    ax.set_ylabel("batch-1 decode speedup")
    ax.set_title(f"Speculative decoding, SmolLM2-135M ({args.target}), k={args.k}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def render(data: dict, plot_path: Path | None) -> None:
    """Print the header, tables and exactness check of a run's data (and draw its chart)."""
    args, res = argparse.Namespace(**data["args"]), data["results"]
    print(f"Machine: {data['machine']}; SmolLM2-135M-Instruct ({args.target}) target, draft {data['draft']}, "
          f"k={args.k}; batch 1: {args.prompts} prompts per task, {args.new} new tokens; throughput: "
          f"{args.tp_new} new tokens per request; median of {args.runs}\n")
    print(tables(res, args))
    bad = check_exact(res, args)
    print("\nGreedy outputs with speculation equal the baseline's: " +
          ("yes, every row" if not bad else f"NO: {', '.join(bad)}"))
    if plot_path:
        plot(res, args, plot_path)


def main() -> None:
    """Run every (layout, proposer, policy) in its own process and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--proposers", nargs="+", default=list(PROPOSERS), choices=list(PROPOSERS))
    ap.add_argument("--target", default="float32", choices=("float32", "gguf"))
    ap.add_argument("--draft", help="draft checkpoint with the target's tokenizer, or first:N (the target's first N "
                    "layers); default: the bundled Q4_1 GGUF")
    ap.add_argument("--k", type=int, default=4, help="--num-speculative-tokens")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per batch-1 request")
    ap.add_argument("--tp-new", type=int, default=64, help="tokens generated per request in the throughput runs")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per task")
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-mb", type=float, default=2048.0, help="KV cache MiB per rank (64 requests must fit)")
    ap.add_argument("--wait", type=float, default=90.0, help="max seconds to wait for other load to stop")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 prompt per task, 8 tokens, 2 requests")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--plot", type=Path, help="write a PNG bar chart of the batch-1 speedups here")
    ap.add_argument("--report", type=Path, help="print the tables (and --plot) of a --json file again; run nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from meshlm.parallel.launch import die_with_parent

        die_with_parent()
        job = json.loads(args.child)
        if os.environ.get("MESHLM_SPEC_LOG"):
            handler = logging.FileHandler(f"{os.environ['MESHLM_SPEC_LOG']}.{job['name'].replace(' ', '_')}.log", "a")
            logger = logging.getLogger("meshlm.engine.spec_policy")
            logger.setLevel(logging.DEBUG)
            logger.addHandler(handler)
        print(json.dumps(measure(job)))
        return
    if args.report:
        render(json.loads(args.report.read_text()), args.plot)
        return
    if args.quick:
        args.new, args.tp_new, args.prompts, args.concurrency, args.runs, args.wait = 8, 4, 1, [2], 1, 0.0
    t0 = time.time()
    target = target_path(args.target)
    draft = args.draft or target_path("gguf")
    if draft.startswith("first:"):
        draft = str(draft_checkpoint(Path(target_path("float32")), int(draft[len("first:"):])))
    base = {"target": target, "draft": draft, "k": args.k, "new": args.new, "tp_new": args.tp_new,
            "prompts": args.prompts, "runs": args.runs, "threads": args.threads, "kv_mb": args.kv_mb,
            "wait": args.wait, "concurrency": args.concurrency}
    jobs = []
    for lay in args.layouts:
        # batch 1 and throughput in separate processes, as for the proposers: the throughput runs' first prompts are
        # the batch-1 prompts, which a process that ran batch 1 would find in its prefix cache
        jobs.append({**base, "name": f"{lay} none", "layout": lay, "proposer": "none", "adaptive": True,
                     "tasks": list(TASKS), "concurrency": []})
        jobs.append({**base, "name": f"{lay} none", "layout": lay, "proposer": "none", "adaptive": True, "tasks": []})
        for p in args.proposers:
            for t in TASKS:
                jobs.append({**base, "name": f"{lay} {p} policy-on", "layout": lay, "proposer": p, "adaptive": True,
                             "tasks": [t], "concurrency": []})
            for pol in ("on", "off"):
                jobs.append({**base, "name": f"{lay} {p} policy-{pol}", "layout": lay, "proposer": p,
                             "adaptive": pol == "on", "tasks": []})
    res: dict = {}
    for j in jobs:
        r = json.loads(json.dumps(run_child(j)))  # JSON keys: str(n)
        mine = res.setdefault(j["name"], {"batch1": {}, "throughput": {}})
        mine["batch1"].update(r["batch1"])
        mine["throughput"].update(r["throughput"])
    keep = ("layouts", "proposers", "target", "k", "new", "tp_new", "prompts", "concurrency", "runs")
    data = {"machine": common.machine(), "draft": Path(draft).name, "args": {k: getattr(args, k) for k in keep},
            "results": res}
    if args.json:
        args.json.write_text(json.dumps(data))
    render(data, args.plot)
    common.log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
