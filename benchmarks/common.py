"""Shared helpers for benchmarks: deterministic random Llama checkpoints, prompts, machine facts, load checks.

Checkpoints are built once into $MESHLM_BENCH_CACHE (default ~/.cache/meshlm/bench/NAME) and reused:
config.json from transformers' LlamaConfig, safetensors weights drawn from a seeded generator (no model
init, so a 400M build takes seconds), and a WordLevel tokenizer whose token i is the text "w<i>.".
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CACHE = Path(os.environ.get("MESHLM_BENCH_CACHE", Path.home() / ".cache" / "meshlm" / "bench"))
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
WEIGHT_STD = 0.02  # HF's init; values do not change CPU speed (fp32 stays far from denormals)

# LlamaConfig keyword arguments per benchmark model; head_dim = hidden / heads = 64 for both.
MODELS: dict[str, dict] = {
    "llama-100m": dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4),
    "llama-400m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=8),
}


def log(msg: str) -> None:
    """Progress line on stderr (stdout is kept for results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1, UNK: 2, **{f"w{i}.": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([BOS, EOS, UNK])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "unk_token": UNK, "add_bos_token": False}, indent=1))


def param_count(name: str) -> int:
    """Parameters of a benchmark model (counted on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(name))
    return sum(p.numel() for p in model.parameters())


def _config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name], max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
                       tie_word_embeddings=False, dtype="float32")


def random_llama(name: str, seed: int = 0) -> Path:
    """Path of the random `name` checkpoint, building it on first use (deterministic in `seed`)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path = CACHE / name
    if (path / "DONE").exists():
        return path
    log(f"building {name} in {path}")
    path.mkdir(parents=True, exist_ok=True)
    cfg = _config(name)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for n in sorted(shapes):  # sorted: the draw order, hence the weights, depend only on the names
        w = torch.randn(shapes[n], generator=g)
        weights[n] = 1.0 + 0.1 * w if n.endswith("norm.weight") else WEIGHT_STD * w
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(path))
    _write_tokenizer(path, cfg.vocab_size)
    (path / "DONE").write_text(f"{sum(w.numel() for w in weights.values())}\n")
    return path


def prompt_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """n deterministic token ids, avoiding the special ids 0..2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()


def stat_ticks() -> tuple[int, int]:
    """(all, idle + iowait) CPU ticks since boot, summed over CPUs."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v), v[3] + v[4]


def _tree_ticks(root: int) -> int:
    """User + system ticks used so far by process `root` and its live descendants."""
    parent, ticks = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parent[int(d.name)], ticks[int(d.name)] = int(rest[1]), int(rest[11]) + int(rest[12])
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, pp in parent.items() if pp == p and c not in tree]
    return sum(ticks.get(p, 0) for p in tree)


def _own_ticks() -> int:
    """Ticks of this process tree: the live processes plus children already reaped (os.times)."""
    t = os.times()
    return _tree_ticks(os.getpid()) + round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


@contextmanager
def other_load() -> Iterator[list[float]]:
    """Yields a one-item list; on exit it holds the share of all CPUs that processes outside this process
    tree used during the block (0.0 where /proc is unavailable)."""
    box = [0.0]
    try:
        (t0, i0), m0 = stat_ticks(), _own_ticks()
    except OSError:
        yield box
        return
    yield box
    (t1, i1), m1 = stat_ticks(), _own_ticks()
    box[0] = max(0.0, ((t1 - t0) - (i1 - i0) - (m1 - m0)) / max(1, t1 - t0))


def cpu_busy(dt: float = 0.5) -> float:
    """Fraction of all CPUs busy over the next dt seconds (from /proc/stat; 0.0 where unavailable)."""
    try:
        t0, i0 = stat_ticks()
        time.sleep(dt)
        t1, i1 = stat_ticks()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


LOCK = CACHE / ".run.lock"  # held (LOCK_EX) by quiet_run for the length of one timed run


def _lock_busy() -> bool:
    """True while some benchmark holds LOCK in quiet_run."""
    if not LOCK.exists():
        return False
    with open(LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def wait_quiet(limit: float = 0.2, timeout_s: float = 120.0, respect_lock: bool = True) -> float:
    """Wait (up to timeout_s) until other work uses under `limit` of the CPUs and no benchmark holds the
    run lock; return the last CPU reading."""
    deadline, said = time.time() + timeout_s, 0.0
    busy = cpu_busy()
    while (busy > limit or (respect_lock and _lock_busy())) and time.time() < deadline:
        if time.time() - said > 10:
            held = respect_lock and _lock_busy()
            log(f"machine {busy:.0%} busy with other work{' (run lock held)' * held}; waiting")
            said = time.time()
        time.sleep(1.0)
        busy = cpu_busy()
    return busy


@contextmanager
def quiet_run(wait_s: float = 60.0) -> Iterator[float]:
    """Hold the run lock (one timed run at a time among benchmarks using this module), then wait for
    quiet (at most MESHLM_BENCH_WAIT_S seconds when set); yields the other load seen last."""
    wait_s = float(os.environ.get("MESHLM_BENCH_WAIT_S", wait_s))
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield wait_quiet(timeout_s=wait_s, respect_lock=False)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def machine() -> str:
    """One line naming the CPU, core count, memory and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem_gib = float("nan")
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, torch {torch.__version__}"


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """q-th percentile (0..100) by nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]
