"""Upcycle a dense Llama-family model into a Mixtral-format mixture of experts that still speaks.

    python -m meshlm.upcycle OUT_DIR [--model PATH] [--experts 4] [--top-k 2] [--noise 0.01] [--dtype bfloat16]

Every expert of layer l is a copy of the dense MLP of layer l, the down projection of each perturbed by
N(0, (noise x std(down))^2); the router is random (N(0, 0.02^2)), so tokens spread over the experts. The
routing weights are renormalized over the top-k (Mixtral), so with --noise 0 every token's MoE output is
sum_k w_k MLP(x) = MLP(x): the upcycled model reproduces the dense model's logits (tests check this).
The folder (config.json, safetensors shards of a few layers each, tokenizer) loads with meshlm and
transformers alike. Default source: the bundled SmolLM2-135M-Instruct, dequantized.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from meshlm.checkpoint import open_checkpoint
from meshlm.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYERS_PER_SHARD = 4
ROUTER_STD = 0.02


def mixtral_config(src: dict, experts: int, top_k: int, dtype: str) -> dict:
    """The dense config.json dict as a MixtralForCausalLM one with `experts` experts, `top_k` per token."""
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "head_dim")
    out = {k: src[k] for k in keep if k in src}
    return {**out, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": experts,
            "num_experts_per_tok": top_k, "sliding_window": None, "hidden_act": "silu", "torch_dtype": dtype,
            "router_jitter_noise": 0.0, "output_router_logits": False}


def upcycle(out: str | Path, model: str | None = None, experts: int = 4, top_k: int = 2, noise: float = 0.01,
            dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write the upcycled Mixtral folder to `out`; returns its path."""
    if not 1 <= top_k <= experts:
        raise ConfigError(f"--top-k {top_k} must be in 1..--experts ({experts}).")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    ckpt = open_checkpoint(model)
    cfg = ckpt.cfg
    if cfg.is_moe or cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise ConfigError(f"{ckpt.path} is {cfg.architecture}; upcycling takes a dense Llama or Mistral model "
                          "(Qwen2's q/k/v biases have no place in a Mixtral checkpoint).")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    to = DTYPES[dtype]
    names = set(ckpt.source.names())
    shard: dict[str, torch.Tensor] = {}

    def flush(index: int) -> None:
        if shard:
            save_file(shard, str(out / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
            shard.clear()

    for name in sorted(n for n in names if not n.startswith("model.layers.")):
        shard[name] = ckpt.source.read(name).to(to).contiguous()
    flush(0)
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}."
        for name in sorted(n for n in names if n.startswith(pre) and ".mlp." not in n):
            shard[name] = ckpt.source.read(name).to(to).contiguous()
        gate, up, down = (ckpt.source.read(f"{pre}mlp.{p}_proj.weight") for p in ("gate", "up", "down"))
        moe = f"{pre}block_sparse_moe."
        shard[f"{moe}gate.weight"] = (ROUTER_STD * torch.randn(experts, cfg.hidden_size, generator=g)).to(to)
        for e in range(experts):
            w2 = down + noise * down.std() * torch.randn(down.shape, generator=g)
            shard.update({f"{moe}experts.{e}.w1.weight": gate.to(to).clone(),
                          f"{moe}experts.{e}.w3.weight": up.to(to).clone(),
                          f"{moe}experts.{e}.w2.weight": w2.to(to).contiguous()})
        if (layer + 1) % LAYERS_PER_SHARD == 0:
            flush(1 + layer // LAYERS_PER_SHARD)
    flush(1 + cfg.num_layers // LAYERS_PER_SHARD)
    raw = getattr(ckpt.source, "config", None) or json.loads((Path(ckpt.path) / "config.json").read_text())
    config = mixtral_config(raw, experts, top_k, dtype)
    config["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    ckpt.tokenizer.tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(ckpt.tokenizer.config, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m meshlm.upcycle OUT_DIR [options]."""
    p = argparse.ArgumentParser(prog="python -m meshlm.upcycle", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (config.json, *.safetensors, tokenizer)")
    p.add_argument("--model", default=None, help="dense HF folder or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--experts", type=int, default=4, help="experts per layer (default 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--noise", type=float, default=0.01,
                   help="std of the noise on each expert's down projection, relative to its weights' std "
                        "(default 0.01; 0: identical experts, the dense model's logits)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="stored precision (default bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router and the noise (default 0)")
    a = p.parse_args(argv)
    try:
        path = upcycle(a.out, a.model, a.experts, a.top_k, a.noise, a.dtype, a.seed)
    except ConfigError as e:
        print(f"meshlm.upcycle: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {a.experts} experts, top-{a.top_k}, noise {a.noise}, {a.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
