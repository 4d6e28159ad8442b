"""A `meshlm serve` subprocess for end-to-end tests: start, wait for /health, read /metrics, stop, reap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from meshlm.parallel.launch import free_port
from meshlm.serve.metrics import parse_samples

API_KEY = "test-key-7f3a"  # given to the server through the environment only
KEY_ENV = "MESHLM_E2E_KEY"


def descendants(pid: int) -> list[int]:
    """Every live descendant pid of pid, from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_model(path: Path, max_position: int = 2048) -> Path:
    """A tiny random Llama (2 layers, 8 heads / 2 KV heads) with a longer context than the test kinds."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import torch
    from helpers import _write_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_position,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    _write_tokenizer(path, 512)
    return path


class Server:
    """One server process; `url`, `headers` (with the API key when one is set), and helpers."""

    def __init__(self, model: Path | None, *args: str, tp: int = 2, api_key: str | None = API_KEY,
                 log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_name = Path(model).name if model else "SmolLM2-135M-Instruct"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESHLM_THREADS": "1"}
        cmd = [sys.executable, "-m", "meshlm.cli", "serve", "--tp", str(tp), "--port", str(self.port), *args]
        cmd += ["--model", str(model)] if model else []
        if api_key:
            env[KEY_ENV] = api_key
            cmd += ["--api-key-env", KEY_ENV]
        folder = log_dir or Path(model).parent  # pytest's tmp folder
        self.log = open(folder / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.pids: list[int] = []

    def wait_healthy(self, timeout: float = 120.0) -> Server:
        """Block until /health answers 200 (raises with the server log if it dies or times out)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.pids = descendants(self.proc.pid)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        """Everything the server printed so far."""
        self.log.flush()
        return Path(self.log.name).read_text()

    def client(self, **kw) -> httpx.Client:
        """An httpx client with the base URL and the API key (plus any `headers` given)."""
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[str, float]:
        """/metrics samples as {"name{labels}": value}."""
        r = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10)
        r.raise_for_status()
        return parse_samples(r.text)

    def rank_pids(self, replica: int = 0) -> list[int]:
        """A replica's ranks by rank: its rank 0 (the replica process) first, then the ranks it spawned."""
        entry = httpx.get(self.url + "/health", timeout=5).json()["replicas"][replica]
        pid = entry["pid"]
        return [pid] + sorted(p for p in descendants(pid)
                              if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes().decode(
                                  errors="ignore"))

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the exit code; kill on timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def leftovers(self, within: float = 10.0) -> list[int]:
        """Descendants seen at start that are still alive after `within` seconds."""
        deadline = time.time() + within
        while time.time() < deadline:
            left = [p for p in self.pids if alive(p)]
            if not left:
                return []
            time.sleep(0.1)
        return [p for p in self.pids if alive(p)]


def completion(model: str, **kw) -> dict:
    """A small valid /v1/completions body."""
    return {"model": model, "prompt": "w5. w6. w7.", "max_tokens": 4, "temperature": 0, **kw}


def check_error(r: httpx.Response, status: int) -> dict:
    """The status and the exact OpenAI error shape; the error object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]
