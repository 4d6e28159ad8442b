"""Quality per precision: perplexity on the shipped text and greedy agreement, meshlm beside llama.cpp.

    python benchmarks/quality.py [--model FILE.gguf] [--ctx 512] [--chunks N] [--new-tokens 32]
                                 [--precisions float32 bfloat16 file int8 int4 int4-min]
                                 [--llama-bin DIR] [--llama-threads 1] [--json out.json]

Rows, all from the same weights (default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF):
  float32 / bfloat16   the file dequantized (LLM(file, dtype=...))
  file                 the file's own formats kept quantized (LLM(file, dtype="auto"))
  int8 / int4 / int4-min   the float32 weights quantized at load: LLM(f32 copy, dtype="float32", quantize=...)
                       (Q8_0, Q4_0, Q4_1); the f32 copy is the file dequantized (meshlm.quality.float_gguf,
                       cached under ~/.cache/meshlm/quality), since --quantize refuses a quantized file
Perplexity is meshlm.quality.perplexity: llama-perplexity's scheme (non-overlapping ctx-token chunks, the
second half of each scored) on meshlm/data/alice.txt; "vs f32" is the ratio to the float32 row's.
Greedy: --new-tokens greedy tokens on each of PROMPTS against the float32 model's: prompts identical, the
mean matching prefix, and the teacher-forced top-1 agreement (the model fed the float32 tokens).

llama.cpp (--llama-bin, or $MESHLM_LLAMA_BIN: a folder with llama-quantize and llama-perplexity): the
file converted once to F32 (`llama-quantize --allow-requantize FILE f32.gguf F32`), then F32 -> BF16,
Q8_0, Q4_0, Q4_1 with llama-quantize's defaults (it keeps the tied embedding/head at Q8_0 for the
quantized types; the "llama.cpp weights" column lists each file's tensor types), cached under
~/.cache/meshlm/llamacpp; each scored by `llama-perplexity -m F -f alice.txt -c CTX -t T [--chunks N]`.
The "file" row's llama.cpp figure is the file itself. Without the binaries the llama.cpp columns are
skipped with a message. Perplexity does not depend on timing: this script needs no quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import common

from meshlm.quality import TEXT, float_gguf, greedy_agreement, perplexity, text_ids

PROMPTS = ("The capital of France is", "Once upon a time", "The theory of relativity states that",
           "def fibonacci(n):", "The best way to learn a new language is")
# row -> (LLM keyword arguments, llama.cpp type); the file row loads the GGUF itself, the rest its folder
ROWS = {
    "float32": ({"dtype": "float32"}, "F32"),
    "bfloat16": ({"dtype": "bfloat16"}, "BF16"),
    "file": ({"dtype": "auto"}, None),
    "int8": ({"dtype": "float32", "quantize": "int8"}, "Q8_0"),
    "int4": ({"dtype": "float32", "quantize": "int4"}, "Q4_0"),
    "int4-min": ({"dtype": "float32", "quantize": "int4-min"}, "Q4_1"),
}
LLAMA_CACHE = Path.home() / ".cache" / "meshlm" / "llamacpp"
F32_CACHE = Path.home() / ".cache" / "meshlm" / "quality"


def weight_formats(model) -> str:
    """Counts of the 2-D weights' storage: kept formats by name, float ones by dtype."""
    from meshlm.kernels.qformat import info

    c = Counter(info(p).fmt.name if info(p) else str(p.dtype).removeprefix("torch.")
                for p in model.parameters() if p.dim() >= 2)
    return ", ".join(f"{k} x{v}" for k, v in c.most_common())


def gguf_formats(path: Path) -> str:
    """Counts of a GGUF file's 2-D tensor types."""
    from gguf import GGUFReader

    c = Counter(t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) >= 2)
    return ", ".join(f"{k} x{v}" for k, v in c.most_common())


def float_copy(file: Path) -> Path:
    """The float32 copy of a GGUF file (made once, cached by name, size and mtime)."""
    st = file.stat()
    dst = F32_CACHE / f"{file.stem}-{st.st_size}-{st.st_mtime_ns}.F32.gguf"
    if not dst.exists():
        F32_CACHE.mkdir(parents=True, exist_ok=True)
        common.log(f"writing the float32 copy of {file.name} to {dst}")
        float_gguf(file, dst)
    return dst


def open_llm(row: str, model: Path, file: Path | None):
    """The row's LLM, or (None, why) when this meshlm cannot build it. model: the checkpoint; file: the
    GGUF file when it is one."""
    from meshlm import LLM
    from meshlm.errors import ConfigError

    kwargs, _ = ROWS[row]
    if row == "file" and file is None:
        return None, "the model is not a GGUF file"
    path = float_copy(file) if "quantize" in kwargs and file is not None else model
    try:
        return LLM(str(path), progress=False, **kwargs), ""
    except (TypeError, ConfigError) as e:  # a meshlm without quantize= / dtype="auto"
        return None, f"{type(e).__name__}: {e}"


def llama_files(bin_dir: Path, file: Path) -> dict[str, Path]:
    """llama.cpp's GGUF of each type, made from `file` with llama-quantize (cached)."""
    LLAMA_CACHE.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    f32 = LLAMA_CACHE / f"{file.stem}.F32.gguf"
    for t in ("F32", "BF16", "Q8_0", "Q4_0", "Q4_1"):
        dst = LLAMA_CACHE / f"{file.stem}.{t}.gguf"
        if not dst.exists():
            src, extra = (file, ["--allow-requantize"]) if t == "F32" else (f32, [])
            common.log(f"llama-quantize {src.name} -> {dst.name}")
            tmp = dst.with_suffix(".tmp")
            subprocess.run([str(bin_dir / "llama-quantize"), *extra, str(src), str(tmp), t],
                           check=True, capture_output=True, text=True)
            tmp.rename(dst)
        out[t] = dst
    return out


def llama_perplexity(bin_dir: Path, gguf: Path, ctx: int, threads: int, chunks: int | None) -> dict:
    """llama-perplexity's final estimate on the shipped text."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(TEXT), "-c", str(ctx), "-t", str(threads)]
    cmd += ["--chunks", str(chunks)] if chunks else []
    common.log(" ".join(cmd))
    run = subprocess.run(cmd, capture_output=True, text=True)
    text = run.stdout + run.stderr
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", text)
    if run.returncode or not m:
        raise RuntimeError(f"llama-perplexity failed ({run.returncode}):\n{text[-2000:]}")
    n = re.search(r"perplexity over (\d+) chunks", text)
    return {"ppl": float(m.group(1)), "error": float(m.group(2)), "chunks": int(n.group(1)) if n else None,
            "command": " ".join(cmd), "weights": gguf_formats(gguf)}


def main() -> int:
    """Run the rows, print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="a .gguf file or a float model folder (default: the bundled SmolLM2 Q4_1 GGUF)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-perplexity -c)")
    ap.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (both engines)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--precisions", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--llama-bin", default=os.environ.get("MESHLM_LLAMA_BIN"),
                    help="folder holding llama-quantize and llama-perplexity (default $MESHLM_LLAMA_BIN)")
    ap.add_argument("--llama-threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    args = ap.parse_args()

    from meshlm import SamplingParams
    from meshlm.checkpoint.cache import default_gguf_path

    model = Path(args.model).expanduser() if args.model else default_gguf_path()
    file = model if model.suffix.lower() == ".gguf" else None
    greedy = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    results: dict[str, dict] = {}
    ref_tokens = prompts = None
    for row in ["float32"] + [r for r in args.precisions if r != "float32"]:
        llm, why = open_llm(row, model, file)
        if llm is None:
            common.log(f"{row}: skipped ({why})")
            results[row] = {"skipped": why}
            continue
        with llm:
            ids = text_ids(llm.tokenizer)
            ids = ids[:args.chunks * args.ctx] if args.chunks else ids
            common.log(f"{row}: perplexity over {len(ids) // args.ctx} chunks of {args.ctx}")
            ppl = perplexity(llm, ids, args.ctx)
            prompts = prompts or [llm.encode_prompt(p) for p in PROMPTS]
            tokens = [o.token_ids for o in llm.generate(prompts, greedy)]
            ref_tokens = ref_tokens or tokens
            agree = greedy_agreement(llm, prompts, ref_tokens, tokens)
            results[row] = {"weights": weight_formats(llm.model), **asdict(ppl), **asdict(agree)}
    if args.llama_bin and file is not None:
        bin_dir = Path(args.llama_bin)
        if not (bin_dir / "llama-perplexity").exists():
            common.log(f"--llama-bin {bin_dir}: no llama-perplexity there; llama.cpp columns skipped")
        else:
            files = llama_files(bin_dir, file)
            for row in args.precisions:
                gguf = file if ROWS[row][1] is None else files[ROWS[row][1]]
                results.setdefault(row, {})["llama"] = llama_perplexity(bin_dir, gguf, args.ctx,
                                                                        args.llama_threads, args.chunks)
    else:
        common.log("llama.cpp columns skipped: pass --llama-bin DIR (a build with llama-quantize and "
                   "llama-perplexity) or set $MESHLM_LLAMA_BIN")
    print(table(results, args.precisions))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": common.machine(), "args": vars(args),
                                               "results": results}, indent=1))
    return 0


def table(results: dict[str, dict], rows: list[str]) -> str:
    """The markdown table of the docs' Quality section."""
    f32 = results.get("float32", {}).get("ppl")
    lf32 = results.get("float32", {}).get("llama", {}).get("ppl")
    out = ["| precision | meshlm weights | meshlm PPL | vs f32 | llama.cpp weights | llama.cpp PPL | vs F32 | "
           "greedy identical | matching prefix | forced top-1 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = results.get(row, {})
        lm = r.get("llama")
        ours = (f"{r['weights']} | {r['ppl']:.4f} ± {r['error']:.4f} | {r['ppl'] / f32:.4f}" if "ppl" in r and f32
                else "skipped | - | -")
        theirs = (f"{lm['weights']} | {lm['ppl']:.4f} ± {lm['error']:.4f} | "
                  + (f"{lm['ppl'] / lf32:.4f}" if lf32 else "-")) if lm else "- | - | -"
        agree = (f"{r['identical']}/{r['prompts']} | {r['prefix']:.1f}/{r['new_tokens']} | {r['forced']:.3f}"
                 if "forced" in r else "- | - | -")
        out.append(f"| {row} | {ours} | {theirs} | {agree} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
