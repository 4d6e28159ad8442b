"""Tiny random-init Hugging Face checkpoints for tests, built deterministically into a folder.

`make_checkpoint(kind, path)` is a plain function so distributed tests can rebuild the same
checkpoint from a subprocess: `python tests/helpers.py KIND PATH [NUM_LAYERS]`.
"""

from __future__ import annotations

import json
import random
import sys
import zlib
from pathlib import Path

import torch

KINDS = ("llama_gqa", "llama_odd_heads", "llama3_rope", "llama_bias", "qwen2", "mistral", "mistral_window",
         "mixtral", "qwen2_moe", "olmoe")

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
WEIGHT_STD = 0.15  # larger than HF's 0.02 so logits are peaked and greedy text is not one repeated token
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def token_text(i: int) -> str:
    """The tokenizer's string for id i >= 3: 'w<i>.'; no token's text is a substring of another's."""
    return f"w{i}."


def _hf_config(kind: str, num_layers: int | None):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, OlmoeConfig, Qwen2Config, Qwen2MoeConfig

    common = dict(vocab_size=512, num_hidden_layers=num_layers or 2, max_position_embeddings=256,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None, tie_word_embeddings=False)
    if kind == "llama_gqa":  # 8 query heads share 2 KV heads
        return LlamaConfig(**common, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=16)
    if kind == "llama_odd_heads":  # 9 heads, 3 KV heads: nothing divides evenly by 2
        return LlamaConfig(**common, hidden_size=144, intermediate_size=192, num_attention_heads=9,
                           num_key_value_heads=3, head_dim=16)
    if kind == "llama3_rope":  # llama3 scaling with a short original context, so every band is exercised
        common["max_position_embeddings"] = 512
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, rope_parameters=rope)
    if kind == "llama_bias":  # attention_bias puts a bias on q, k, v *and* o; mlp_bias on gate/up/down
        return LlamaConfig(**common, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    if kind == "qwen2":  # q/k/v biases, tied embeddings, rms eps 1e-6, theta 1e6
        common.update(vocab_size=1024, tie_word_embeddings=True)
        return Qwen2Config(**common, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                           num_key_value_heads=2, rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if kind == "mistral":  # head_dim 32 * 8 heads != hidden 128
        return MistralConfig(**common, hidden_size=128, intermediate_size=224, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=32, sliding_window=None)
    if kind == "mistral_window":  # an 8-token sliding window: prompts and generations run far past it
        return MistralConfig(**common, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, sliding_window=8)
    if kind == "mixtral":  # 4 experts, top-2
        return MixtralConfig(**common, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen2_moe":  # 8 experts top-2, unnormalized; a gated shared expert; layer 1 dense
        common["num_hidden_layers"] = num_layers or 3
        return Qwen2MoeConfig(**common, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                              shared_expert_intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                              mlp_only_layers=[1] if (num_layers or 3) > 1 else [])
    if kind == "olmoe":  # 8 experts top-2, unnormalized; RMSNorm over the whole q and k projections
        return OlmoeConfig(**common, hidden_size=128, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    raise ValueError(f"unknown checkpoint kind {kind!r}; pick one of {KINDS}")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter from a private generator: norms ~ 1 + N(0, 0.2), the rest N(0, WEIGHT_STD)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)  # HF zero-inits biases; make them matter
            else:
                p.copy_(WEIGHT_STD * noise)


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {BOS: BOS_ID, EOS: EOS_ID, UNK: UNK_ID, **{token_text(i): i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([BOS, EOS, UNK])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "unk_token": UNK, "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }, indent=1))


def make_checkpoint(kind: str, path: str | Path, num_layers: int | None = None) -> Path:
    """Write a deterministic random-init `kind` checkpoint (safetensors + tokenizer) into `path`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    cfg = _hf_config(kind, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed=zlib.crc32(kind.encode()))  # stable per kind, whatever KINDS holds
    model.save_pretrained(str(path), safe_serialization=True)
    _write_tokenizer(path, cfg.vocab_size)
    return path


def load_reference(path: str | Path):
    """The checkpoint loaded by transformers (eager attention, fp32, eval); its generate() ignores eos."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # compare with meshlm's ignore_eos=True
    return model.eval()


class Oracle:
    """Proposes the reference continuation, with one wrong token in every third proposal (so accepts, partial
    accepts, corrections and bonus tokens all happen)."""

    name = "oracle"

    def __init__(self, refs: dict[tuple[int, ...], list[int]]) -> None:
        self.seqs = [list(p) + list(r) for p, r in refs.items()]  # prompt + reference output
        self.calls, self.released = 0, []

    def propose(self, reqs, ks):
        """The next ks[i] reference tokens of each request, one of them wrong now and then."""
        from meshlm.engine.speculative import Proposal

        out = []
        for r, k in zip(reqs, ks):
            n = len(r.tokens)
            toks = next((s[n:n + k] for s in self.seqs if s[:n] == r.tokens), [])
            self.calls += 1
            if toks and self.calls % 3 == 0:
                i = self.calls % len(toks)
                toks[i] = 3 + (toks[i] + 1) % 500
            out.append(Proposal(tuple(toks)))
        return out

    def backlog(self, req):
        """Nothing to catch up on."""
        return 0

    def release(self, request_id):
        """Remember who was released."""
        self.released.append(request_id)


class FakeClock:
    """A perf_counter the test advances: injected timings."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CatchUpProposer:
    """Proposes token 1 k times; each call costs `per_token` seconds a proposed token plus `per_fed` a token it
    catches up on (a draft's first pass over a prompt), on the injected clock."""

    name = "draft"

    def __init__(self, clock: FakeClock, per_token: float, per_fed: float) -> None:
        self.clock, self.per_token, self.per_fed = clock, per_token, per_fed
        self.seen: dict[str, int] = {}

    def backlog(self, req) -> int:
        """The tokens of req not yet taken in."""
        return len(req.tokens) - self.seen.get(req.id, 0)

    def propose(self, reqs, ks):
        """Take in each request's backlog, then propose token 1 k times (advancing the clock)."""
        from meshlm.engine.speculative import Proposal

        out = []
        for r, k in zip(reqs, ks):
            fed = self.backlog(r)
            self.seen[r.id] = len(r.tokens)
            self.clock.now += self.per_token * k + self.per_fed * fed
            out.append(Proposal((1,) * k, None, fed))
        return out

    def release(self, request_id):
        """Forget the request."""
        self.seen.pop(request_id, None)


def decoding_request(rid: str, prompt_len: int, params, max_new: int):
    """A running request that is decoding: every token but the last computed, nothing in flight."""
    from meshlm.engine.request import Request, Status

    req = Request(rid, list(range(3, 3 + prompt_len)), params, max_new=max_new)
    req.tokens.append(7)
    req.num_computed = req.num_scheduled = len(req.tokens) - 1
    req.status = Status.RUNNING
    return req


if __name__ == "__main__":
    make_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)


# GGUF models written by the gguf package (llama.cpp's layout: reversed dims, q/k rows permuted per head).
GGUF_K_SCALES = {"Q6_K": (208,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q3_K": (108,), "Q2_K": (80, 82)}  # fp16 fields


def _gguf_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf row order for q/k: per head, (2, r/2) -> (r/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_model(path: str | Path, qtype: str = "Q8_0", hidden: int = 128, inter: int = 256, heads: int = 4,
                     kv_heads: int = 2, head_dim: int = 32, layers: int = 2, vocab: int = 500,
                     raw: dict[str, str] | None = None) -> Path:
    """A random llama GGUF whose 2-D weights are stored as qtype (norms F32), tokens 'w<i>.'; raw maps a
    GGUF tensor name to another type written as random bytes (for unsupported-type errors)."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(zlib.crc32(f"{qtype}{hidden}{head_dim}".encode()))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_context_length(256)
    w.add_vocab_size(vocab)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([BOS, EOS, UNK] + [token_text(i) for i in range(3, vocab)])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)

    def matrix(name: str, rows: int, cols: int, n_head: int = 0) -> None:
        x = (WEIGHT_STD * rng.standard_normal((rows, cols))).astype(np.float32)
        if n_head:
            x = _gguf_permute(x, n_head)
        kind = (raw or {}).get(name, qtype)
        t = Q[kind]
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind in GGUF_K_SCALES or name in (raw or {}):  # random blocks with small fp16 scales
            block, size = gguf.GGML_QUANT_SIZES[t]
            data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            for at in GGUF_K_SCALES.get(kind, ()):
                data[..., at:at + 2] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
            w.add_tensor(name, data.reshape(rows, -1), raw_dtype=t)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.2 * rng.standard_normal(hidden)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden, heads)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, kv_heads)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_up.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, inter)
    norm("output_norm.weight")
    matrix("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# Activations: the CPU quantized kernel rounds x to int8 per block of 32 (step max|x| / 127, error <= step / 2,
# about 0.5% RMS of a block), as llama.cpp does. Through SmolLM2's 30 layers that moved the logits by 2.0-3.3%
# of their RMS (measured against the same weights in float32; greedy near-ties it flipped were 0.06-0.16 apart
# at a logit RMS of 5-13); the bound is 6%. (The PyTorch path, dequantize then F.linear, rounds nothing: 0.)
ACTIVATION_ROUNDING = 0.06


def assert_greedy_agrees(got: list[list[int]], ref: list[list[int]], prompts: list[list[int]],
                         ref_logits, rel: float = ACTIVATION_ROUNDING) -> None:
    """Greedy tokens equal the reference's, except at a near-tie: where a sequence first differs, the
    reference's own logits there must rank its token above ours by less than 2 x rel x their RMS (what
    activation rounding can move); the rest of that sequence is not compared. ref_logits: ids -> [B, S, V]."""
    for p, g, r in zip(prompts, got, ref):
        i = next((j for j, (a, b) in enumerate(zip(g, r)) if a != b), None)
        if i is None:
            assert len(g) == len(r)
            continue
        logits = ref_logits([p + r[:i]])[0, -1]
        gap = (logits[r[i]] - logits[g[i]]).item()
        assert gap < 2 * rel * logits.square().mean().sqrt().item(), \
            f"token {i} differs ({g[i]} vs {r[i]}) and is no near-tie: the reference prefers its own by {gap:.3f}"


def repeat_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 3..58 tokens, each with a repeated stretch (so the n-gram lookup finds matches)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(3, 512) for _ in range(rng.randrange(3, 30))]
        out.append(p + p[: rng.randrange(1, len(p) + 1)])
    return out
