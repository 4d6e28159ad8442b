"""Bad input gets a MeshlmError whose message names the problem; the CLI prints it without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from meshlm import LLM, SamplingParams
from meshlm.errors import CheckpointError, ConfigError, MeshlmError, RequestError

KIND = "llama_gqa"


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A private, editable copy of a fixture checkpoint."""
    return shutil.copytree(checkpoint(KIND), tmp_path / "model")


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="does not exist") as e:
        LLM(str(missing), progress=False)
    assert str(missing) in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(str(tmp_path), progress=False)


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="not a .gguf file"):
        LLM(str(path), progress=False)


def test_invalid_config_json(folder):
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        LLM(str(folder), progress=False)


def test_config_missing_a_field(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        LLM(str(folder), progress=False)


@pytest.mark.parametrize("keep", [0.5, 100], ids=["data_cut", "header_cut"])
def test_truncated_safetensors(folder, keep):
    path = folder / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep) if keep < 1 else keep)
    with pytest.raises(CheckpointError, match="truncated") as e:
        LLM(str(folder), progress=False)
    assert "model.safetensors" in str(e.value)


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="No .safetensors weights"):
        LLM(str(folder), progress=False)


def test_missing_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        LLM(str(folder), progress=False)


def test_missing_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        LLM(str(folder), progress=False)


def test_unsupported_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*not supported"):
        LLM(str(folder), progress=False)


def test_unsupported_rope_scaling(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        LLM(str(folder), progress=False)


def test_prompt_longer_than_context(checkpoint):
    small = LLM(str(checkpoint(KIND)), max_context=16, progress=False)
    with pytest.raises(RequestError, match="20 tokens but the context window is 16"):
        small.generate([list(range(3, 23))])
    with pytest.raises(RequestError, match="16 tokens"):  # a full window leaves no room to generate
        small.generate([list(range(3, 19))])
    assert len(small.generate([list(range(3, 18))], SamplingParams(max_tokens=5))[0].token_ids) == 1


def test_bad_prompts(llm):
    model = llm(KIND)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        model.generate([[5, model.cfg.vocab_size]])
    with pytest.raises(RequestError, match="empty"):
        model.generate("")
    with pytest.raises(RequestError, match="No prompts"):
        model.generate([])
    with pytest.raises(RequestError, match="2 sampling params for 1 prompts"):
        model.generate([[5, 6]], [SamplingParams(), SamplingParams()])


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop=("",)), "stop"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(MeshlmError, match=field) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, ValueError)  # callers catching ValueError see it too


@pytest.mark.parametrize("kwargs", [dict(top_p=1.0), dict(top_p=0.01), dict(temperature=0.0),
                                    dict(max_tokens=1), dict(stop="x")])
def test_good_sampling_params(kwargs):
    p = SamplingParams(**kwargs)
    assert isinstance(p.stop, tuple)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "meshlm.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def assert_one_paragraph_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr[proc.stderr.find("meshlm: error: "):].strip()  # after any loading progress bar
    assert err.startswith("meshlm: error: "), proc.stderr
    assert "\n" not in err  # one paragraph, the last thing printed
    for needle in needles:
        assert needle in err


def test_cli_missing_model_exits_2_without_traceback():
    proc = run_cli("generate", "x", "--model", "/nonexistent")
    assert_one_paragraph_error(proc, "/nonexistent", "does not exist")
    assert proc.stdout == ""


def test_cli_bad_sampling_and_long_prompt(checkpoint):
    path = str(checkpoint(KIND))
    assert_one_paragraph_error(run_cli("generate", "w5.", "--model", path, "--top-p", "1.5"), "top_p")
    long_prompt = " ".join(f"w{i}." for i in range(3, 23))
    proc = run_cli("generate", long_prompt, "--model", path, "--max-context", "16")
    assert_one_paragraph_error(proc, "context window is 16")
