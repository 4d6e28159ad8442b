"""`meshlm plan` and `--dry-run` from the command line: no process started, no weights read."""

from __future__ import annotations

import json

import pytest
from test_plan_memory import LLAMA3_8B, LLAMA3_70B, LLAMA3_405B

from meshlm.cli import main
from meshlm.plan import cluster as clusters

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "max_position_embeddings": 256}


@pytest.fixture
def local_host(tmp_path, monkeypatch):
    """A fixed 'local' profile: a two-rank CPU host with 8 GiB."""
    d = json.loads(json.dumps(clusters.PRESETS["cpu-host"]))
    d["node"].update(devices=2)
    d["node"]["device"]["memory_gib"] = 8
    path = clusters.save(clusters.from_dict(d), tmp_path / "local.json")
    monkeypatch.setenv(clusters.PROFILE_ENV, str(path))
    return path


def write_model(tmp_path, d: dict, name: str = "model"):
    """A folder with only config.json (planning never needs weights)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    return folder


def test_plan_prints_the_table_and_json(tmp_path, capsys):
    """The 405B plan on two nodes: a table by default, the same as JSON with --json."""
    model = write_model(tmp_path, LLAMA3_405B) / "config.json"
    args = ["plan", "--model", str(model), "--cluster", "2x8xH100",
            "--workload", "prompt=2048,output=512,batch=16"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "chosen: dp=1 pp=2 tp=8" in text and "binding constraint: memory" in text
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chosen"]["layout"] == {"dp": 1, "pp": 2, "tp": 8}


def test_plan_exits_nonzero_when_nothing_fits(tmp_path, capsys):
    """405B on one node: exit 1 and the fix."""
    model = write_model(tmp_path, LLAMA3_405B)
    assert main(["plan", "--model", str(model), "--cluster", "8xH100"]) == 1
    assert "no layout fits" in capsys.readouterr().out


def test_generate_dry_run_passes_and_shows_uneven_heads(tmp_path, local_host, capsys):
    """tp=2 of a tiny model fits; its heads split 4 + 4 and the KV check passes."""
    model = write_model(tmp_path, TINY)
    assert main(["generate", "hello there", "--model", str(model), "--tp", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no process started" in out and "heads per tp rank: q 4+4 of 8" in out and "OK: KV holds" in out


def test_dry_run_rejects_too_many_tp_ranks(tmp_path, local_host, capsys):
    """tp=16 on 8 heads fails before anything starts, naming tp <= 8."""
    model = write_model(tmp_path, TINY)
    assert main(["generate", "hi", "--model", str(model), "--tp", "16", "--dry-run"]) == 1
    assert "tp <= 8" in capsys.readouterr().out


def test_serve_dry_run_checks_kv_against_the_longest_request(tmp_path, local_host, capsys):
    """A KV pool smaller than one max-context request fails and says to raise --kv-cache-mb."""
    model = write_model(tmp_path, TINY)
    assert main(["serve", "--model", str(model), "--kv-cache-mb", "0.01", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "FAIL memory" in out and "--kv-cache-mb" in out
    assert main(["serve", "--model", str(model), "--kv-cache-mb", "64", "--dry-run"]) == 0


def test_dry_run_names_a_layout_that_fits(tmp_path, local_host, monkeypatch, capsys):
    """70B in fp32 on an 8 GiB host fits nowhere; Llama-3-8B in fp32 (32 GB) on 24 GB GPUs needs tp=2."""
    model = write_model(tmp_path, LLAMA3_70B)
    assert main(["generate", "hi", "--model", str(model), "--dry-run"]) == 1
    assert "raise tp" in capsys.readouterr().out
    gpus = clusters.save(clusters.resolve("4xRTX4090-pcie"), tmp_path / "gpus.json")
    monkeypatch.setenv(clusters.PROFILE_ENV, str(gpus))
    eight = write_model(tmp_path, LLAMA3_8B, "eight")
    assert main(["generate", "hi", "--model", str(eight), "--dry-run", "--max-context", "4096"]) == 1
    assert "fits: dp=1 pp=1 tp=2 (run with --tp 2 --pp 1)" in capsys.readouterr().out
    args = ["generate", "hi", "--model", str(eight), "--dry-run", "--max-context", "4096"]
    assert main(args + ["--tp", "2"]) == 0


def test_dry_run_of_more_ranks_than_devices(tmp_path, local_host, capsys):
    """tp=2 x pp=2 on a two-rank host (meshlm runs it; ranks share the cores): checked, with a note, not a crash;
    the host's memory is shared by all four ranks."""
    model = write_model(tmp_path, TINY)
    assert main(["generate", "hi", "--model", str(model), "--tp", "2", "--pp", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: 4 ranks on 2 devices" in out and "OK: KV holds" in out
    assert f"of {0.9 * 8 / 4 * 2**30 / 1e9:.1f} GB usable" in out
